"""serve.py: a real uvicorn server on 127.0.0.1 answers every endpoint and batches
concurrent callers correctly; without a checkpoint it explains how to get one."""

import os
import socket
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from genrec_jax.config import ConfigError
from genrec_jax.serve import cli
from genrec_jax.serve.app import create_app

from .conftest import SERVE_OVERRIDES, concurrent_recommends, events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine, serve_cfg):
    """uvicorn serving the shared engine in a thread; yields the base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(serve_cfg, engine), host="127.0.0.1", port=port,
                                        log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(500):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    yield url
    srv.should_exit = True
    thread.join(10)


def test_server_answers_every_endpoint(server):
    with httpx.Client(base_url=server, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["status"] == "ready"
        ids = [it["item_id"] for it in c.get("/v1/items", params={"limit": 10}).json()["items"]]
        r = c.post("/v1/recommend", json={"user_id": "srv", "history": events(ids[:4]), "k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        r = c.post("/v1/rank", json={"history": events(ids[:4]), "candidates": ids[4:]})
        assert r.status_code == 200 and len(r.json()["items"]) == 6
        r = c.post("/v1/items", json={"items": [{"item_id": "x", "features": [1.0]}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items[0].features"
        r = c.post("/v1/recommend", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert "genrec_batch_size" in c.get("/metrics").text


def test_concurrent_callers_get_their_own_results(server, engine, rng):
    """Requests batched together must each get the answer to their own history."""
    hists = [events([f"i{int(x)}" for x in rng.integers(1, 121, int(rng.integers(1, 20)))]) for _ in range(32)]
    expected = [[d["item_id"] for d in engine.recommend(h, k=5)] for h in hists]
    before = engine.prefix.hits + engine.prefix.misses

    got = concurrent_recommends(server, hists, "conc")
    assert got == expected, "a caller received another caller's recommendations"
    assert engine.prefix.hits + engine.prefix.misses - before == len(hists), "every user_id request is counted"
    with httpx.Client(base_url=server) as c:
        count = [line for line in c.get("/metrics").text.splitlines() if line.startswith("genrec_batch_size_count")]
    assert count and float(count[0].split()[-1]) > 0


def test_no_checkpoint_explains_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "python train.py" in err and "--checkpoint" in err
    assert cli.main(["--checkpoint", str(tmp_path)]) == 2
    assert "not a finished training run" in capsys.readouterr().err


def test_default_run_is_served_when_present(tmp_path, monkeypatch, tiny_run):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_run, tmp_path / "runs" / "synthetic")
    assert cli.resolve_checkpoint(None, out=lambda m: None) == cli.DEFAULT_RUN


def test_build_app_applies_serve_overrides_only(tiny_run):
    app = cli.build_app(tiny_run, SERVE_OVERRIDES + ["serve.queue_size=3"])
    assert app.state.service.cfg.queue_size == 3 and app.state.service.engine is None  # built at start-up
    with pytest.raises(ConfigError, match="serve"):
        cli.serve_config(tiny_run, ["model.num_layers=3"])


def test_gil_switch_interval_follows_the_config():
    from genrec_jax.config import ServeConfig

    before = sys.getswitchinterval()
    try:
        assert cli.apply_gil_switch_interval(ServeConfig(gil_switch_interval_ms=2.0)) == 0.002
        assert abs(sys.getswitchinterval() - 0.002) < 1e-9
        assert cli.apply_gil_switch_interval(ServeConfig(gil_switch_interval_ms=0.0)) == 0.005
        assert abs(sys.getswitchinterval() - 0.005) < 1e-9
        assert ServeConfig().gil_switch_interval_ms == 0.5
    finally:
        sys.setswitchinterval(before)

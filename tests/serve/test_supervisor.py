"""The multi-process server (supervisor.py, ``serve.py --workers N``): two HTTP front-end
processes answer every endpoint exactly as the single-process server does, each caller
gets its own answer, a full engine queue and the front ends' in-flight cap refuse at once,
a front end that dies is reported and replaced, and SIGTERM leaves no process behind.

Most tests run the supervisor in a thread over the session's engine (no second compile);
the last one runs ``serve.py --workers 2`` as a real process tree.
"""

import concurrent.futures
import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from genrec_jax.config import ServeConfig
from genrec_jax.serve.app import create_app
from genrec_jax.serve.supervisor import Supervisor

from .conftest import SERVE_OVERRIDES, concurrent_recommends, events

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import serve_load  # noqa: E402
from .test_app import MALFORMED, finished_while_blocked, gated, submitted, wait_submitted  # noqa: F401 -- fixtures
from .test_cli import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_ready(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> dict:
    return serve_load.wait_ready(url, proc, timeout, None, poll_s=0.05, error=AssertionError)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(Path(stat).parent.name))
    return out


class Running:
    """A supervisor serving in a thread of this process."""

    def __init__(self, cfg, engine, workers: int = 2):
        self.sup = Supervisor(dataclasses.replace(cfg, http_workers=workers), lambda: engine, workers=workers,
                              port=0, log_level="warning")
        self.thread = threading.Thread(target=self.sup.run, name="test-supervisor", daemon=True)
        self.thread.start()
        assert self.sup.started.wait(30)
        self.url = f"http://127.0.0.1:{self.sup.port}"
        wait_ready(self.url)

    def stop(self) -> None:
        pids = self.sup.front_end_pids()
        self.sup.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the supervisor did not stop"
        assert not [p for p in pids if alive(p)], "front ends outlived their supervisor"


def wait_catalog_copies(url: str, timeout: float = 30.0) -> int:
    """Wait until every front end resolves requests with a catalogue copy; its size."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("genrec_frontend_catalog_items ") and float(line.split()[1]) > 0:
                return int(float(line.split()[1]))
        time.sleep(0.1)
    raise AssertionError("the front ends did not copy the catalogue")


@pytest.fixture(scope="module")
def mp(engine, serve_cfg):
    run = Running(serve_cfg, engine)
    # Every request below then travels resolved (packed ids) where the copy knows its items.
    assert wait_catalog_copies(run.url) == len(engine.catalog)
    yield run
    run.stop()


@pytest.fixture(scope="module")
def single(engine, serve_cfg):
    with TestClient(create_app(serve_cfg, engine)) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.02)
        yield c


def test_every_endpoint_answers_as_in_one_process(mp, single):
    def same(method, path, **kw):
        r = httpx.request(method, mp.url + path, timeout=10, **kw)
        s = single.request(method, path, **kw)
        assert r.status_code == s.status_code, (path, r.text, s.text)
        a, b = r.json(), s.json()
        for body in (a, b):
            if isinstance(body, dict):
                body.pop("latency_ms", None)
        assert a == b, f"{method} {path} answers differently with front-end processes"
        return a

    assert same("GET", "/healthz") == {"status": "ok"}
    assert same("GET", "/readyz")["status"] == "ready"
    same("GET", "/v1/items", params={"limit": 7, "offset": 3})
    body = same("POST", "/v1/recommend", json={"history": events(["i3", "i9", "i27"]), "k": 7,
                                               "exclude_history": True, "context": {"timestamp": 1_700_010_000}})
    assert len(body["items"]) == 7
    same("POST", "/v1/recommend", json={"history": events([3, "i9"]), "k": 5, "exclude_items": ["i1", 2]})
    same("POST", "/v1/rank", json={"history": events(["i3", "i9"]), "candidates": ["i5", "i6", "i100"]})
    same("POST", "/v1/rank", json={"history": events(["i3"]), "candidates": ["i5", "i6", "i7"], "sort": True})
    same("POST", "/v1/recommend", json={"history": events(["i1"]), "mode": "generative", "k": 3})  # 409
    assert httpx.get(mp.url + "/openapi.json").json() == single.get("/openapi.json").json()
    metrics = httpx.get(mp.url + "/metrics").text
    for name in ("genrec_request_latency_seconds_bucket", "genrec_batch_size_bucket", "genrec_queue_depth",
                 "genrec_prefix_cache_hit_rate", "genrec_compiles_total", "genrec_errors_total",
                 "genrec_event_loop_lag_seconds"):
        assert name in metrics, f"/metrics lacks {name}"
    assert 'genrec_errors_total{error_class="unsupported"}' in metrics, "engine-side errors are counted"
    # the request's time split between the front end, the socket and the engine process
    for name in ("genrec_engine_roundtrip_seconds", "genrec_engine_request_seconds"):
        for op in ("recommend", "rank"):
            counts = [float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith(f'{name}_count{{op="{op}"}}')]
            assert counts and counts[0] >= 2, f"/metrics lacks {name} for {op}: {counts}"


def test_concurrent_callers_get_their_own_results(mp, engine, rng):
    hists = [events([f"i{int(x)}" for x in rng.integers(1, 121, int(rng.integers(1, 20)))]) for _ in range(32)]
    expected = [[d["item_id"] for d in engine.recommend(h, k=5)] for h in hists]

    got = concurrent_recommends(mp.url, hists, "mp")
    assert got == expected, "a caller received another caller's recommendations"


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_4xx_naming_the_field(mp, case):
    _, method, path, body, status, field = case
    if isinstance(body, bytes):
        r = httpx.request(method, mp.url + path, content=body, headers={"content-type": "application/json"})
    elif body is None:
        r = httpx.request(method, mp.url + path)
    else:
        r = httpx.request(method, mp.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if field is not None:
        assert err["field"] == field and err["message"].startswith(field), err
    assert "Traceback" not in r.text


def test_cold_start_registration_is_forwarded(mp, item_features):
    with httpx.Client(base_url=mp.url, timeout=60) as c:
        before = c.get("/v1/items").json()["total"]
        r = c.post("/v1/items", json={"items": [{"item_id": "mp-cold", "features": item_features[21].tolist()}]})
        assert r.status_code == 201, r.text
        assert r.json()["items"][0]["item_id"] == "mp-cold" and r.json()["total"] == before + 1
        page = c.get("/v1/items", params={"offset": before}).json()["items"]
        assert page == [{"item_id": "mp-cold", "cold_start": True}]
        r = c.post("/v1/recommend", json={"history": events(["mp-cold", "i3"]), "k": 3})
        assert r.status_code == 200, r.text
        r = c.post("/v1/items", json={"items": [{"item_id": "mp-cold", "features": item_features[21].tolist()}]})
        assert r.status_code == 422 and r.json()["error"]["field"].startswith("items[0]")


def refusal_run(url: str, n: int, first: int = 0):
    def call(i):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/recommend", json={"history": events([f"i{i + 1}"]), "k": 3}, timeout=30)
        return r, time.perf_counter() - t0

    pool = concurrent.futures.ThreadPoolExecutor(n)
    return pool, [pool.submit(call, first + i) for i in range(n)]


def test_full_engine_queue_refuses_without_waiting_for_the_engine(engine, serve_cfg, gated):  # noqa: F811
    run = Running(dataclasses.replace(serve_cfg, queue_size=2, max_inflight=64, timeout_ms=20_000.0), engine)
    try:
        pool, futs = refusal_run(run.url, 12)
        early = finished_while_blocked(futs, 6)  # <= 4 in the blocked batch + 2 queued: >= 6 refused
        gated.set()
        results = [f.result(30) for f in futs]
        pool.shutdown()
    finally:
        gated.set()
        run.stop()
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) >= 6, codes
    assert len(early) >= 6, "refusals must not wait for the busy engine"
    for r, _ in early:
        assert r.status_code == 503 and r.json()["error"]["type"] == "queue_full" and r.headers.get("retry-after")


def test_front_end_caps_its_forwarded_requests(engine, serve_cfg, gated, submitted):  # noqa: F811
    run = Running(dataclasses.replace(serve_cfg, queue_size=64, max_inflight=3, timeout_ms=20_000.0), engine,
                  workers=1)
    try:
        pool, held = refusal_run(run.url, 3)
        wait_submitted(submitted, 3)  # forwarded: the front end's cap is full
        late_pool, late = refusal_run(run.url, 5, first=3)
        refused = finished_while_blocked(late, 5)
        gated.set()
        done = [f.result(30) for f in held]
        pool.shutdown()
        late_pool.shutdown()
    finally:
        gated.set()
        run.stop()
    assert [r.status_code for r, _ in done] == [200, 200, 200]
    assert len(refused) == 5, "the cap's refusals must not wait for the busy engine"
    for r, _ in refused:
        assert r.status_code == 503 and r.json()["error"]["type"] == "busy", r.text


def test_dead_front_end_is_reported_and_replaced(mp, caplog):
    victim = mp.sup.front_end_pids()[0]
    with caplog.at_level("ERROR", logger="genrec_jax.serve"):
        os.kill(victim, signal.SIGKILL)
        for _ in range(200):
            pids = mp.sup.front_end_pids()
            if victim not in pids and all(alive(p) for p in pids):
                break
            time.sleep(0.05)
    assert victim not in pids and len(pids) == 2, "the dead front end was not replaced"
    assert mp.sup.deaths == 1
    assert any(f"pid {victim}" in rec.getMessage() and "exited" in rec.getMessage() for rec in caplog.records)
    wait_ready(mp.url)
    with httpx.Client(base_url=mp.url, timeout=10) as c:  # new connections: either front end may take them
        assert all(c.get("/healthz").status_code == 200 for _ in range(10))


def test_port_in_use_is_refused_without_starting_anything(serve_cfg):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sup = Supervisor(serve_cfg, lambda: None, workers=2, port=taken.getsockname()[1])
        assert sup.run() == 1 and sup.front_ends == [] and sup.service.engine is None


STAND_IN = """
import os, socket, subprocess, sys, time
s = socket.create_server(("127.0.0.1", 0))
p = subprocess.Popen([sys.executable, "-m", "genrec_jax.serve.frontend", "--fd", str(s.fileno()),
                      "--engine-socket", sys.argv[1], "--config", sys.argv[2], "--parent-pid", str(os.getpid()),
                      "--log-level", "warning"], pass_fds=(s.fileno(),))
print(p.pid, s.getsockname()[1], flush=True)
time.sleep(60)
"""


def test_front_end_stops_when_its_supervisor_is_killed():
    """A supervisor killed outright (SIGKILL: no clean-up of its own) leaves no front end
    running, and its private directory is removed by the front end."""
    private = Path(tempfile.mkdtemp(prefix="genrec-serve-"))
    config = private / "serve_config.json"
    config.write_text(json.dumps(dataclasses.asdict(ServeConfig())))
    stand_in = subprocess.Popen([sys.executable, "-c", STAND_IN, str(private / "engine.sock"), str(config)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pid, port = map(int, stand_in.stdout.readline().split())
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert alive(pid)
    finally:
        stand_in.kill()
        stand_in.wait(10)
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.1)
    assert not alive(pid), "a front end outlived its killed supervisor"
    for _ in range(50):  # it removes the directory as it exits
        if not private.exists():
            break
        time.sleep(0.1)
    assert not private.exists()


def test_serve_py_workers_shuts_down_cleanly(tiny_run, tmp_path):
    """serve.py --workers 2: SIGTERM to the parent stops both front ends and the engine,
    removes its private directory, and exits 0."""
    port = free_port()
    before = set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "genrec-serve-*")))
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(tiny_run), "--port", str(port),
           "--workers", "2", "--log-level", "info"]
    for o in SERVE_OVERRIDES:
        cmd += ["--set", o]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=120, proc=proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"history": events(["i3"]), "k": 3})
        assert r.status_code == 200, r.text
        front = children(proc.pid)
        assert len(front) == 2, f"expected two front-end processes, found {front}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert not [p for p in front if alive(p)], "front ends outlived the server"
    after = set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "genrec-serve-*")))
    assert not after - before, "the private directory was left behind"
    text = log.read_text()
    assert "SIGTERM" in text and "stopped" in text and "Traceback" not in text


def test_default_inflight_cap_shares_two_batches_among_the_front_ends():
    from genrec_jax.config import ServeConfig
    from genrec_jax.serve.frontend import inflight_cap

    cap = lambda **kw: inflight_cap(ServeConfig(**{"batch_buckets": [1, 16, 64], **kw}))  # noqa: E731
    assert cap(http_workers=4) == 32 and cap(http_workers=2) == 64 and cap(http_workers=8) == 16
    assert cap(http_workers=3) == 43  # rounded up: together at least two batches
    assert cap(http_workers=16) == 16  # floor
    assert cap(http_workers=0) == 128
    assert cap(http_workers=4, max_inflight=5) == 5  # the setting wins

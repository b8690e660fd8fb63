#!/usr/bin/env python
"""CPU per request of the HTTP layer alone: the app's routes with the model replaced by an
instant answer, with the lean routes (``serve.lean_routes``) on and off, in one run.

    python bench/serve_frontend.py [--requests 3000] [--history-lens 32,256] [--http]
        [--json rows.jsonl]

Past the engine's own limit, the multi-process server's rate is set by how much CPU its
HTTP front ends spend per request (README, Known limits). This measures that cost without
a model or a GPU:

* ``asgi`` rows: the app (``app.build_app``: middleware, validation, routes, error format,
  metrics) is called directly as an ASGI application, one request after another; CPU time
  (``time.process_time``) per request. Nothing of the HTTP server is counted.
* ``http`` rows (``--http``): the same app under uvicorn (uvloop and httptools when
  installed, as ``uvicorn[standard]`` brings) in a child process, driven over loopback by
  ``--connections`` keep-alive connections, closed loop, for ``--seconds``; the child's CPU
  seconds (user + system, from /proc) per answered request and its requests/s at that CPU.

The backend answers ``recommend`` with k=10 items and ``rank`` with scores for every
candidate, at once, as the engine process's answer would arrive. Every answer is checked
(status 200, the items it should hold), so a broken path cannot report a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_rows  # noqa: E402

TASKS = ("engagement", "retention", "monetization")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000, help="requests per asgi row")
    p.add_argument("--history-lens", default="32,256")
    p.add_argument("--candidates", type=int, default=100, help="candidates per rank request")
    p.add_argument("--http", action="store_true", help="also the http rows (uvicorn in a child process)")
    p.add_argument("--seconds", type=float, default=4.0, help="per http row")
    p.add_argument("--connections", type=int, default=32, help="http: keep-alive connections, one request each")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "lean:port": serve the stub app
    return p.parse_args(argv)


class StubBackend:
    """What the app's routes call (``app.Service`` / ``frontend.RemoteEngine``), answering at once."""

    def __init__(self):
        self.items = [{"item_id": f"i{i}", "score": 1.0 / (i + 1)} for i in range(10)]

    def overloaded(self) -> bool:
        return False

    async def recommend(self, a: dict) -> dict:
        assert a["history"] and a["k"] == 10
        return {"items": self.items, "model_version": "stub"}

    async def rank(self, a: dict) -> dict:
        return {"items": [{"item_id": str(c), "scores": {t: 0.5 for t in TASKS}} for c in a["candidates"]],
                "model_version": "stub"}

    async def readiness(self):
        return 200, {"status": "ready"}


def build(lean: bool):
    from genrec_jax.config import ServeConfig
    from genrec_jax.serve.app import build_app
    from genrec_jax.serve.metrics import RequestMetrics

    cfg = ServeConfig(lean_routes=lean, max_loop_lag_ms=0, max_history_len=1024, max_candidates=2048)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield

    return build_app(cfg, StubBackend(), RequestMetrics(), lifespan=lifespan, queue_full=lambda: False,
                     max_inflight=0)


def bodies(endpoint: str, history_len: int, candidates: int, n: int = 64) -> list[bytes]:
    out = []
    for j in range(n):
        hist = [{"item_id": f"i{(j * 7 + i) % 1000}", "timestamp": 1_700_000_000 + 60 * i} for i in range(history_len)]
        body = {"user_id": f"u{j}", "history": hist}
        if endpoint == "rank":
            body["candidates"] = [f"i{(j + c) % 1000}" for c in range(candidates)]
        else:
            body.update(k=10, mode="retrieval")
        out.append(json.dumps(body).encode())
    return out


def check(endpoint: str, status: int, payload: bytes, candidates: int) -> None:
    if status != 200:
        raise SystemExit(f"{endpoint}: HTTP {status}: {payload[:300]!r}")
    items = json.loads(payload)["items"]
    want = candidates if endpoint == "rank" else 10
    if len(items) != want:
        raise SystemExit(f"{endpoint}: {len(items)} items in the answer, expected {want}")


# ----------------------------------------------------------------------------- asgi rows


async def asgi_row(app, endpoint: str, reqs: list[bytes], n: int, candidates: int) -> float:
    path = f"/v1/{endpoint}"

    async def one(body: bytes):
        sent = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}
        delivered = False

        async def receive():
            nonlocal delivered
            if delivered:
                await asyncio.sleep(3600)
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(msg):
            sent.append(msg)

        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    for body in reqs[:8]:  # warm-up, and check the answers
        check(endpoint, *(await one(body)), candidates)
    t0 = time.process_time()
    for i in range(n):
        status, _ = await one(reqs[i % len(reqs)])
        if status != 200:
            raise SystemExit(f"{endpoint}: HTTP {status}")
    return (time.process_time() - t0) / n


# ----------------------------------------------------------------------------- http rows


def child_main(spec: str) -> None:
    import uvicorn

    lean, port = spec.split(":")
    uvicorn.run(build(lean == "1"), host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_row(port: int, pid: int, endpoint: str, reqs: list[bytes], args) -> dict:
    from bench.serve_load import RawClient

    client = RawClient(f"http://127.0.0.1:{port}", args.connections)
    path = f"/v1/{endpoint}"
    for body in reqs[:8]:
        check(endpoint, *(await client.post(path, body, 10.0)), args.candidates)
    done = [0]
    stop_at = time.perf_counter() + args.seconds

    async def worker(k: int):
        i = k
        while time.perf_counter() < stop_at:
            status, _ = await client.post(path, reqs[i % len(reqs)], 10.0)
            if status != 200:
                raise SystemExit(f"{endpoint}: HTTP {status}")
            done[0] += 1
            i += args.connections

    c0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(args.connections)))
    cpu, wall = cpu_seconds(pid) - c0, time.perf_counter() - t0
    client.close()
    return {"requests": done[0], "cpu_us_per_request": 1e6 * cpu / done[0], "requests_per_s": done[0] / wall,
            "server_cpu_busy": cpu / wall}


def serve_child(lean: bool) -> tuple[subprocess.Popen, int]:
    from bench.serve_load import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--child", f"{int(lean)}:{port}"], cwd=REPO)
    end = time.time() + 60
    while time.time() < end:
        try:
            import urllib.request

            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the stub server exited at start")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the stub server did not start within 60 s")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    lens = [int(x) for x in args.history_lens.split(",") if x]
    work = [(ep, n) for n in lens for ep in ("recommend", "rank")]
    rows = []
    apps = {lean: build(lean) for lean in (False, True)}
    for ep, n in work:
        reqs = bodies(ep, n, args.candidates)
        for lean in (False, True):
            cpu = asyncio.run(asgi_row(apps[lean], ep, reqs, args.requests, args.candidates))
            rows.append({"mode": "asgi", "endpoint": ep, "history_len": n, "lean_routes": lean,
                         "requests": args.requests, "cpu_us_per_request": 1e6 * cpu})
    if args.http:
        for lean in (False, True):
            proc, port = serve_child(lean)
            try:
                for ep, n in work:
                    r = asyncio.run(http_row(port, proc.pid, ep, bodies(ep, n, args.candidates), args))
                    rows.append({"mode": "http", "endpoint": ep, "history_len": n, "lean_routes": lean, **r})
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"{'mode':5} {'endpoint':10} {'history':>7} {'lean':>5} {'CPU us/req':>11} {'req/s':>8} {'ratio':>6}")
    for r in rows:
        base = next(b for b in rows if b["mode"] == r["mode"] and b["endpoint"] == r["endpoint"]
                    and b["history_len"] == r["history_len"] and not b["lean_routes"])
        r["cpu_ratio_vs_framework"] = base["cpu_us_per_request"] / r["cpu_us_per_request"]
        rps = f"{r['requests_per_s']:8.0f}" if "requests_per_s" in r else f"{'':8}"
        print(f"{r['mode']:5} {r['endpoint']:10} {r['history_len']:7d} {str(r['lean_routes']):>5} "
              f"{r['cpu_us_per_request']:11.1f} {rps} {r['cpu_ratio_vs_framework']:6.2f}")
    print("ratio: CPU per request through the FastAPI routes / through this row's routes")
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

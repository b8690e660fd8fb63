"""An HTTP front-end process of the multi-process server (``serve.py --workers N``).

The supervisor starts N of these as ``python -m genrec_jax.serve.frontend``, each with the
shared listening socket's file descriptor. Each serves the same app as the single-process
server (``app.build_app``: routes, schemas, OpenAPI, error format, body limits, shedding
on event-loop lag) over ``RemoteEngine``: requests are parsed and validated here, and what
needs the model is forwarded to the engine process (``ipc.EngineClient``). This process
never imports jax.

Request metrics are kept in prometheus-client's multiprocess mode (the supervisor sets
``PROMETHEUS_MULTIPROC_DIR``), so ``GET /metrics`` on any front end sums every front end's,
followed by the engine process's own (batches, queue, compiles, prefix cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from genrec_jax.config import ServeConfig
from genrec_jax.serve.app import LoopWatch, build_app, freeze_heap
from genrec_jax.serve.errors import ServeError
from genrec_jax.serve.ipc import EngineClient, frame_limit
from genrec_jax.serve.metrics import RequestMetrics

log = logging.getLogger("genrec_jax.serve")

# The engine process answers a request past its deadline itself (504); a front end stops
# waiting this much later, for an engine that does not answer at all.
DEADLINE_GRACE_S = 0.25
CONTROL_TIMEOUT_S = 5.0  # readiness, catalogue pages, metrics
ADD_ITEMS_TIMEOUT_S = 600.0  # a registration recompiles the generate step


def inflight_cap(cfg: ServeConfig) -> int:
    """Model requests one front end has forwarded and not yet answered; past it, 503 ("busy")
    before the body is read. ``serve.max_inflight``, else two of the largest batches shared
    among the front ends (at least 16): all of them together keep about one batch running
    and one forming at the engine, so an overloaded server refuses in the front ends, at
    once, instead of queueing behind batches. On the H100 machine four front ends capped at
    32 (this rule with batch 64) kept the admitted p99 at 68-94 ms from 4,000 to 8,000
    requests/s offered; capped at 16, at 48-62 ms, but with more refusals below saturation
    (README, Results): set ``serve.max_inflight`` for that trade."""
    if cfg.max_inflight:
        return cfg.max_inflight
    return max(16, -(-2 * max(cfg.batch_buckets) // max(cfg.http_workers, 1)))


class RemoteEngine(LoopWatch):
    """``app.Service``'s calls, answered by the engine process."""

    def __init__(self, cfg: ServeConfig, client: EngineClient, metrics: RequestMetrics):
        super().__init__(cfg.max_loop_lag_ms)
        self.cfg, self.client = cfg, client
        self.on_lag = metrics.loop_lag.set
        self._exposition = _exposition_registry(metrics)

    def _deadline_s(self, a: dict) -> float:
        return min(a.get("timeout_ms") or self.cfg.timeout_ms, self.cfg.timeout_ms) / 1e3 + DEADLINE_GRACE_S

    async def recommend(self, a: dict) -> dict:
        return await self.client.call("recommend", a, self._deadline_s(a))

    async def rank(self, a: dict) -> dict:
        return await self.client.call("rank", a, self._deadline_s(a))

    async def add_items(self, a: dict) -> dict:
        return await self.client.call("add_items", a, ADD_ITEMS_TIMEOUT_S)

    async def list_items(self, a: dict) -> dict:
        return await self.client.call("list_items", a, CONTROL_TIMEOUT_S)

    async def readiness(self) -> tuple[int, dict]:
        try:
            answer = await self.client.call("ready", {}, CONTROL_TIMEOUT_S)
        except ServeError as e:
            return 503, {"status": "unavailable", "error": e.message}
        return int(answer["status"]), answer["body"]

    async def metrics_text(self) -> bytes:
        own = generate_latest(self._exposition)
        try:
            engine = (await self.client.call("metrics", {}, CONTROL_TIMEOUT_S)).encode()
        except ServeError as e:
            log.warning("engine metrics unavailable: %s", e.message)
            engine = b""
        return own + engine


def _exposition_registry(metrics: RequestMetrics) -> CollectorRegistry:
    """Every front end's request metrics (multiprocess mode), or this one's alone."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return metrics.registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def create_frontend_app(cfg: ServeConfig, client: EngineClient) -> FastAPI:
    """The public API, forwarding to the engine process through ``client``."""
    metrics = RequestMetrics()
    remote = RemoteEngine(cfg, client, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.get_running_loop().create_task(remote.watch_loop())
        freeze_heap()  # the app, its schemas and imports: out of the collector's full passes
        yield
        watcher.cancel()
        await client.close()

    # The engine's queue is in another process: a full one is refused there, at once.
    return build_app(cfg, remote, metrics, lifespan=lifespan, queue_full=lambda: False,
                     max_inflight=inflight_cap(cfg))


def _stop_with_parent(parent_pid: int, server) -> None:
    """A front end whose supervisor is gone (killed outright) stops rather than linger."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    log.warning("the serving process (pid %d) is gone; front end %d stops", parent_pid, os.getpid())
    server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m genrec_jax.serve.frontend",
                                description="One HTTP front end of `serve.py --workers N` (started by it).")
    p.add_argument("--fd", type=int, required=True, help="the listening socket, inherited")
    p.add_argument("--engine-socket", required=True, help="the engine process's Unix socket")
    p.add_argument("--config", required=True, help="JSON of the ServeConfig")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--limit-concurrency", type=int, default=None)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServeConfig(**json.loads(Path(args.config).read_text()))
    app = create_frontend_app(cfg, EngineClient(args.engine_socket, frame_limit(cfg)))
    sock = socket.socket(fileno=args.fd)
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                           limit_concurrency=args.limit_concurrency, timeout_graceful_shutdown=5))
    threading.Thread(target=_stop_with_parent, args=(args.parent_pid, server), name="genrec-parent-watch",
                     daemon=True).start()
    log.info("front end %d serving on %s", os.getpid(), sock.getsockname())
    server.run(sockets=[sock])
    if os.getppid() != args.parent_pid:  # the supervisor was killed: nobody else removes its directory
        shutil.rmtree(Path(args.engine_socket).parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

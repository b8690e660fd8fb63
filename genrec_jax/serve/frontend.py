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
from genrec_jax.serve import ipc
from genrec_jax.serve.app import CATALOG_PAGE, LoopWatch, build_app, freeze_heap, rank_answer
from genrec_jax.serve.errors import RequestError, ServeError
from genrec_jax.serve.inputs import Catalog, parse_history
from genrec_jax.serve.ipc import EngineClient, frame_limit
from genrec_jax.serve.metrics import RequestMetrics

log = logging.getLogger("genrec_jax.serve")

# The engine process answers a request past its deadline itself (504); a front end stops
# waiting this much later, for an engine that does not answer at all.
DEADLINE_GRACE_S = 0.25
CONTROL_TIMEOUT_S = 5.0  # readiness, catalogue pages, metrics
CATALOG_RETRY_S = 0.5  # while the engine compiles: how often a front end asks for the catalogue
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
    """``app.Service``'s calls, answered by the engine process.

    With ``serve.resolve_in_frontends`` it keeps ``catalog``, a copy of the engine's
    catalogue (``load_catalog``), and sends what it can resolve with it packed
    (``resolve``, ``ipc.pack_history``)."""

    def __init__(self, cfg: ServeConfig, client: EngineClient, metrics: RequestMetrics):
        super().__init__(cfg.max_loop_lag_ms)
        self.cfg, self.client = cfg, client
        self.on_lag = metrics.loop_lag.set
        self._exposition = _exposition_registry(metrics)
        self.catalog: Catalog | None = None
        self._catalog_gauge = metrics.catalog_copy
        self._catalog_gauge.set(0)

    def _deadline_s(self, a: dict) -> float:
        return min(a.get("timeout_ms") or self.cfg.timeout_ms, self.cfg.timeout_ms) / 1e3 + DEADLINE_GRACE_S

    async def load_catalog(self) -> None:
        """Copy the engine's catalogue, page by page, once it is ready (retrying while it
        compiles). Requests before that, or if it fails, go unresolved: slower, not wrong."""
        while True:
            try:
                first = await self.client.call("catalog", {"offset": 0, "limit": CATALOG_PAGE}, CONTROL_TIMEOUT_S)
                ids = list(first["items"])
                while len(ids) < first["total"]:
                    page = await self.client.call("catalog", {"offset": len(ids), "limit": CATALOG_PAGE},
                                                  CONTROL_TIMEOUT_S)
                    if not page["items"]:
                        break
                    ids += page["items"]
                break
            except ServeError as e:
                if e.status < 500:  # not "still loading" or unreachable: refused, so do without
                    log.warning("front end %d works without a catalogue copy: %s", os.getpid(), e.message)
                    return
                await asyncio.sleep(CATALOG_RETRY_S)
        # Internal id i is ids[i - 1]; items registered later extend the engine's list only.
        self.catalog = Catalog(["<pad>", *ids], first["actions"])
        self._catalog_gauge.set(len(ids))
        log.info("front end %d resolves requests itself: a copy of %d catalogue items", os.getpid(), len(ids))

    def resolve(self, a: dict, candidates: bool = False) -> dict:
        """``a`` with its history (and rank candidates) packed as internal ids, where the
        catalogue copy knows every one and the engine would accept them; otherwise (an item
        registered since the copy, or any invalid field) ``a`` as it is, for the engine to
        parse and to name the error."""
        cat = self.catalog
        if cat is None:
            return a
        ctx = a.get("context")
        try:
            h = parse_history(a["history"], cat, max_history_len=self.cfg.max_history_len,
                              request_ts=None if not ctx else ctx.get("timestamp"))
        except RequestError:
            return a
        out = dict(a, history=None, packed=ipc.pack_history(h))
        if candidates and 0 < len(a["candidates"]) <= self.cfg.max_candidates:
            try:
                out["packed_candidates"] = ipc.pack_ids(cat.internals(a["candidates"], "candidates"))
                out["candidates"] = None
            except RequestError:
                pass
        return out

    async def recommend(self, a: dict) -> dict:
        return await self.client.call("recommend", self.resolve(a), self._deadline_s(a))

    async def rank(self, a: dict) -> dict:
        sent = self.resolve(a, candidates=True)
        answer = await self.client.call("rank", sent, self._deadline_s(a))
        if "packed_candidates" in sent:  # the engine sent scores only: the items are built here
            return rank_answer(a, answer["scores"], answer["model_version"])
        return answer

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
    client.on_roundtrip = lambda op, seconds: metrics.engine_roundtrip.labels(op).observe(seconds)
    remote = RemoteEngine(cfg, client, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(remote.watch_loop())
        copier = loop.create_task(remote.load_catalog()) if cfg.resolve_in_frontends else None
        freeze_heap()  # the app, its schemas and imports: out of the collector's full passes
        yield
        watcher.cancel()
        if copier is not None:
            copier.cancel()
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

"""The HTTP service: FastAPI routes over the batcher and the engine.

    POST /v1/recommend   top-k items (retrieval head, or beam search over semantic IDs)
    POST /v1/rank        M-FALCON multi-task scores of candidate items
    POST /v1/items       register cold-start items (RQ-VAE semantic IDs)
    GET  /v1/items       page through the catalogue (clients and tests discover valid ids)
    GET  /healthz        the process is up
    GET  /readyz         200 only once every executable is compiled
    GET  /metrics        Prometheus

The engine is built (checkpoint load + ahead-of-time compiles) in a background thread at
start-up, so /healthz answers at once and /readyz tells a load balancer when to send
traffic. Every error leaves as ``{"error": {"type", "message", "field"?}}`` with a 4xx/5xx
status; stack traces stay in the server log.

``build_app`` holds the routes, the error format and the middleware over a backend with
async ``recommend / rank / add_items / list_items / readiness / metrics_text``: ``Service``
runs the engine in this process (``create_app``, the single-process server, and the engine
process of the multi-process one), ``frontend.RemoteEngine`` forwards each call to the
engine process. Both give the same API, schemas and errors. Nothing here imports jax, so
the front-end processes start without it.
"""

import asyncio
import contextlib
import functools
import gc
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genrec_jax.config import ServeConfig
from genrec_jax.serve import ipc
from genrec_jax.serve import schemas as S
from genrec_jax.serve.batcher import Batcher
from genrec_jax.serve.errors import DeadlineExceeded, NotReady, ServeError
from genrec_jax.serve.metrics import EngineMetrics, RequestMetrics, ServeMetrics

if TYPE_CHECKING:
    from genrec_jax.serve.engine import Engine

log = logging.getLogger("genrec_jax.serve")

CATALOG_PAGE = 50_000  # external ids per ``catalog`` page (a few hundred KB of JSON)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorBody, "description": desc} for code, desc in [
        (400, "Body is not valid JSON"), (409, "The checkpoint cannot do this (no decoder / RQ-VAE)"),
        (413, "Body too large"), (415, "Body is not application/json"), (422, "Invalid field (the message names it)"),
        (503, "Not ready, or the queue is full (retry)"), (504, "Deadline exceeded")]
}


def freeze_heap() -> None:
    """Collect once, then move every object alive now (the model, its executables, the
    imported modules) out of the garbage collector's reach (``gc.freeze``): a full
    collection under load otherwise walks all of them with the GIL held, stalling both the
    event loop and the batcher."""
    gc.collect()
    gc.freeze()


class LoopWatch:
    """The event loop's lag: how late a timer that asks to wake every LAG_INTERVAL_S wakes.
    When the loop cannot keep up with the requests arriving, every callback waits behind
    the others and the lag grows with the backlog in the socket buffers."""

    LAG_INTERVAL_S = 0.005
    loop_lag_s: float = 0.0
    on_lag: Callable[[float], None] | None = None  # called with each measurement (seconds)

    def __init__(self, max_loop_lag_ms: float):
        self.max_loop_lag_ms = max_loop_lag_ms

    async def watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.LAG_INTERVAL_S)
            self.loop_lag_s = max(0.0, loop.time() - t - self.LAG_INTERVAL_S)
            if self.on_lag is not None:
                self.on_lag(self.loop_lag_s)

    def overloaded(self) -> bool:
        """The event loop lags more than ``serve.max_loop_lag_ms`` (shed new model requests)."""
        limit = self.max_loop_lag_ms
        return limit > 0 and self.loop_lag_s * 1e3 > limit


def rank_answer(a: dict, scores: dict[str, list[float]], model_version: str) -> dict:
    """A rank request's answer from its candidates (``a["candidates"]``) and their scores
    per task in the same order; sorted by the first task when ``a["sort"]``."""
    names = list(scores)
    cols = [scores[n] for n in names]
    items = [{"item_id": str(c), "scores": dict(zip(names, row))} for c, row in zip(a["candidates"], zip(*cols))]
    if a["sort"]:
        key = names[0]
        items.sort(key=lambda it: -it["scores"][key])
    return {"items": items, "model_version": model_version}


class Service(LoopWatch):
    """The engine in this process (once built), its batcher and metrics; answers the
    routes' calls (``build_app``), or the front ends' frames in the multi-process server
    (``ipc.EngineServer``). Arguments and answers are plain JSON-able dicts."""

    def __init__(self, cfg: ServeConfig, engine_factory: Callable[[], "Engine"], metrics: EngineMetrics):
        super().__init__(cfg.max_loop_lag_ms)
        self.cfg = cfg
        self.metrics = metrics
        self._factory = engine_factory
        self.engine: "Engine | None" = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self._add_lock = threading.Lock()
        self._start_lock = threading.Lock()
        metrics.watch(lambda: self.engine.stats() if self.engine else None,
                      lambda: self.batcher.depth if self.batcher else 0)

    def start(self) -> None:
        """Build the engine (once) and start a batcher (runs in a background thread).

        Idempotent, and restartable: an app whose lifespan ran twice (test clients) gets a
        fresh batcher over the same engine."""
        with self._start_lock:
            if self.engine is None and self.error is None:
                self._build()
            if self.engine is not None and (self.batcher is None or self.batcher.stopped):
                engine = self.engine
                # Late-bound, so a replaced engine.process / dispatch (tests, instrumentation)
                # is what runs.
                self.batcher = Batcher(lambda jobs: engine.process(jobs), max_batch=engine.max_batch,
                                       max_wait_s=self.cfg.max_wait_ms / 1e3, queue_size=self.cfg.queue_size,
                                       on_batch=self.metrics.on_batch, on_done=self.metrics.on_batch_done,
                                       dispatch=lambda jobs: engine.dispatch(jobs),
                                       collect=lambda handle: engine.collect(handle),
                                       depth=self.cfg.pipeline_depth).start()

    def _build(self) -> None:
        try:
            engine = self._factory()
            if not engine.ready:
                engine.warmup()
            engine.on_call = self.metrics.on_step
            freeze_heap()
            self.engine = engine
            log.info("ready: %s", engine.describe())
        except Exception as e:  # noqa: BLE001 -- reported by /readyz, logged in full here
            log.exception("the engine failed to start")
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.batcher is not None and not self.batcher.stopped

    def queue_full(self) -> bool:
        b = self.batcher
        return b is not None and b.depth >= b.queue_size

    def ready_engine(self) -> "Engine":
        if not self.ready:
            raise NotReady("the model is still loading / compiling" if self.error is None
                           else f"the model failed to load: {self.error}")
        return self.engine

    async def run(self, job: Any, timeout_ms: int | None) -> Any:
        timeout_s = min(timeout_ms or self.cfg.timeout_ms, self.cfg.timeout_ms) / 1e3
        # An asyncio future of this loop: the batcher answers a whole batch in one loop wake-up.
        fut = self.batcher.submit(job, timeout_s, loop=asyncio.get_running_loop())
        try:
            async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for on 3.11
                return await fut
        except TimeoutError:
            fut.cancel()
            raise DeadlineExceeded(f"no answer within {1e3 * timeout_s:.0f} ms") from None

    # ----------------------------------------------------------------- the routes' calls

    def _history(self, engine: "Engine", a: dict):
        """The request's events, or the History a front end resolved (``ipc.pack_history``)."""
        packed = a.get("packed")
        if packed is None:
            return a["history"]
        return ipc.unpack_history(packed, max_events=self.cfg.max_history_len, num_items=len(engine.catalog),
                                  num_actions=len(engine.catalog.action_names))

    async def recommend(self, a: dict) -> dict:
        """``a``: ``schemas.request_args`` of a recommend request. The answer lacks ``latency_ms`` (the route adds it)."""
        engine = self.ready_engine()
        job = engine.recommend_job(self._history(engine, a), k=a["k"], mode=a["mode"], context=a["context"],
                                   exclude_history=a["exclude_history"], exclude_items=a["exclude_items"],
                                   user_id=a["user_id"])
        rec = await self.run(job, a["timeout_ms"])
        names = engine.catalog.externals(rec.items)
        return {"items": [{"item_id": n, "score": float(s)} for n, s in zip(names, rec.scores)],
                "model_version": engine.model_version}

    async def rank(self, a: dict) -> dict:
        """``a``: ``schemas.request_args`` of a rank request. With ``packed_candidates`` (a
        front end resolved them) the answer is ``{"scores": {task: [float]}}`` in candidate
        order, and the front end builds the items (``rank_answer``)."""
        engine = self.ready_engine()
        packed = a.get("packed_candidates")
        resolved = None if packed is None else ipc.unpack_ids(packed, max_ids=self.cfg.max_candidates,
                                                               num_items=len(engine.catalog))
        job = engine.rank_job(self._history(engine, a), a["candidates"], context=a["context"], user_id=a["user_id"],
                              resolved=resolved)
        res = await self.run(job, a["timeout_ms"])
        if resolved is not None:
            return {"scores": {n: v.tolist() for n, v in res.scores.items()}, "model_version": engine.model_version}
        return rank_answer(a, {n: v.tolist() for n, v in res.scores.items()}, engine.model_version)

    async def catalog_page(self, a: dict) -> dict:
        """A page of the catalogue for a front end's copy: external ids ``offset + 1 ..`` in
        internal-id order, the action names, and the total."""
        engine = self.ready_engine()
        cat = engine.catalog
        offset, limit = int(a.get("offset", 0)), int(a.get("limit", CATALOG_PAGE))
        return {"items": [x for _, x in cat.page(offset, limit)], "total": len(cat),
                "actions": list(cat.action_names)}

    async def add_items(self, a: dict) -> dict:
        """``a``: ``schemas.add_items_args``."""
        engine = self.ready_engine()

        def register():
            with self._add_lock:  # one registration (and recompile) at a time
                return engine.add_items(a["items"])

        added = await asyncio.to_thread(register)
        return {"items": added, "total": len(engine.catalog)}

    async def list_items(self, a: dict) -> dict:
        engine = self.ready_engine()
        cat = engine.catalog
        page = cat.page(a["offset"], a["limit"])
        return {"items": [{"item_id": x, "cold_start": i > cat.num_trained} for i, x in page],
                "total": len(cat), "offset": a["offset"], "limit": a["limit"]}

    async def readiness(self) -> tuple[int, dict]:
        """(HTTP status, body) of GET /readyz."""
        if not self.ready:
            body = {"status": "failed" if self.error else "loading"}
            if self.error:
                body["error"] = self.error
            return 503, body
        return 200, {"status": "ready", **self.engine.describe()}

    async def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)


def create_app(cfg: ServeConfig, engine: "Engine | Callable[[], Engine]", *,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The single-process server: the engine runs in this process. ``engine``: a built
    engine, or a factory called at start-up in a background thread (so the server answers
    /healthz while it compiles)."""
    from genrec_jax.serve.engine import Engine  # here, not at the top: front ends never import jax

    factory = engine if callable(engine) and not isinstance(engine, Engine) else (lambda: engine)
    metrics = metrics or ServeMetrics()
    svc = Service(cfg, factory, metrics)
    metrics.loop_lag.set_function(lambda: svc.loop_lag_s)  # read at scrape time

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=svc.start, name="genrec-engine-start", daemon=True).start()
        watcher = asyncio.get_running_loop().create_task(svc.watch_loop())
        yield
        watcher.cancel()
        svc.stop()

    # With a latency target and no fixed cap, the limit adapts under two of the largest batches.
    cap = cfg.max_inflight or (max(16, 2 * max(cfg.batch_buckets)) if cfg.target_latency_ms > 0 else 0)
    return build_app(cfg, svc, metrics, lifespan=lifespan, queue_full=svc.queue_full, max_inflight=cap)


def build_app(cfg: ServeConfig, backend: Any, metrics: RequestMetrics, *, lifespan: Callable,
              queue_full: Callable[[], bool], max_inflight: int) -> FastAPI:
    """The public API over ``backend`` (``Service``, or ``frontend.RemoteEngine``): routes,
    schemas, error format, body limits and load shedding. ``queue_full``: refuse model
    requests before parsing them; ``max_inflight``: the in-app cap (0: none), under which the
    limit adapts when ``serve.target_latency_ms`` is set (``InflightLimit``)."""
    schemas = S.build_schemas(cfg)
    app = ServeApp(title="genrec-jax recommendation service", version="1", lifespan=lifespan,
                   description="Generative recommender (HSTU encoder, retrieval / semantic-ID heads, M-FALCON ranking).")
    app.state.service = backend
    _install_error_handlers(app, metrics)
    lean = LeanRoutes(backend, schemas, metrics, cfg.max_body_bytes) if cfg.lean_routes else None
    inflight = InflightLimit(max_inflight, cfg.target_latency_ms, metrics.inflight_limit)
    app.front = ServeMiddleware(functools.partial(FastAPI.__call__, app), limit=cfg.max_body_bytes, metrics=metrics,
                                queue_full=queue_full, overloaded=backend.overloaded, inflight_limit=inflight,
                                lean=lean)

    RecommendRequest, RankRequest = schemas.RecommendRequest, schemas.RankRequest
    AddItemsRequest = schemas.AddItemsRequest

    @app.post("/v1/recommend", response_model=S.RecommendResponse, responses=ERROR_RESPONSES)
    async def recommend(req: RecommendRequest) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        body = await backend.recommend(S.request_args(req))
        body["latency_ms"] = 1e3 * (time.perf_counter() - t0)
        return JSONResponse(body)

    @app.post("/v1/rank", response_model=S.RankResponse, responses=ERROR_RESPONSES)
    async def rank(req: RankRequest) -> Response:  # type: ignore[valid-type]
        t0 = time.perf_counter()
        body = await backend.rank(S.request_args(req))
        body["latency_ms"] = 1e3 * (time.perf_counter() - t0)
        return JSONResponse(body)

    @app.post("/v1/items", response_model=S.AddItemsResponse, status_code=201, responses=ERROR_RESPONSES)
    async def add_items(req: AddItemsRequest) -> dict:  # type: ignore[valid-type]
        return await backend.add_items(S.add_items_args(req))

    @app.get("/v1/items", response_model=S.ItemsPage, responses=ERROR_RESPONSES)
    async def list_items(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31)) -> dict:
        return await backend.list_items({"offset": offset, "limit": limit})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Still loading, or failed to load"}})
    async def readyz() -> Response:
        status, body = await backend.readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics_endpoint() -> Response:
        return Response(await backend.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


# --------------------------------------------------------------------------- errors


def _field_name(loc: tuple) -> str:
    """("body", "history", 0, "item_id", "str") -> "history[0].item_id"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_type_tag(p):
            continue
        else:
            out += f".{p}" if out else str(p)
    return out or (str(loc[0]) if loc else "body")


def _is_type_tag(p: str) -> bool:
    """pydantic appends the union member it tried ("str", "int", "constrained-str"...)."""
    return p in ("str", "int", "float", "bool") or "[" in p or p.startswith(("constrained-", "function-"))


def _error(status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None):
    body: dict[str, Any] = {"type": kind, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def validation_failure(errs: list[dict]) -> tuple[int, str, str, str]:
    """(status, kind, message, field) of a request that failed pydantic validation: 400 for a
    body that is not JSON, else 422 naming the first invalid fields."""
    bad_json = [e for e in errs if e.get("type") == "json_invalid"]
    if bad_json:
        why = (bad_json[0].get("ctx") or {}).get("error") or bad_json[0].get("msg") or "invalid JSON"
        return 400, "invalid_json", f"body: not valid JSON ({why})", "body"
    seen, msgs = set(), []
    for e in errs:
        field = _field_name(tuple(e.get("loc", ())))
        if field in seen:
            continue
        seen.add(field)
        msgs.append((field, e.get("msg", "invalid")))
    return 422, "invalid_request", "; ".join(f"{f}: {m}" for f, m in msgs[:10]), msgs[0][0]


def internal_failure(method: str, path: str, exc: BaseException) -> str:
    """Log an unexpected exception with a reference; the client's message (no stack trace)."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", ref, method, path, exc_info=exc)
    return f"internal error (reference {ref}); the server log has the details"


def _install_error_handlers(app: FastAPI, metrics: RequestMetrics) -> None:
    count = lambda kind: metrics.errors.labels(kind).inc()  # noqa: E731

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, kind, message, field = validation_failure(exc.errors())
        count(kind)
        return _error(status, kind, message, field)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        count(exc.kind)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error(exc.status, exc.kind, exc.message, exc.field, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            count("invalid_json")
            return _error(400, "invalid_json", f"body: not valid JSON ({exc.detail})", "body")
        kind = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        if exc.status_code != 413:  # ServeMiddleware counted it already
            count(kind)
        return _error(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        count("internal")
        return _error(500, "internal", internal_failure(request.method, request.url.path, exc))


# --------------------------------------------------------------------------- admission


class InflightLimit:
    """How many model requests (recommend, rank) may be admitted and unanswered at once.

    Fixed (``serve.max_inflight``, or a front end's share, ``frontend.inflight_cap``), or,
    with ``serve.target_latency_ms`` > 0, adapted between ``MIN`` and that cap so that the
    admitted requests' latency stays near the target past saturation. Behind a saturated
    engine the latency of what is admitted is about in-flight / throughput (Little's law),
    so holding the in-flight count holds the latency; the rest is refused at once (503
    "busy"). Answers are taken in windows (at least ``max(8, limit)`` answers and
    ``WINDOW_S``):

    * the window's 90th percentile over the target, and the in-flight count reached
      ``BINDING`` of the limit during it (our own admissions are what queues): the limit
      shrinks in proportion to the overshoot, at most by half;
    * over the target with few requests in flight (a stall elsewhere, not queueing on what
      was admitted): unchanged, so a hiccup at light load refuses nothing;
    * under the target: it grows by a tenth, at least one, up to the cap.

    A target below the unloaded latency would refuse most of the traffic: set it above the
    p90 seen at light load."""

    MIN = 4
    WINDOW_S = 0.05
    BINDING = 0.8

    def __init__(self, cap: int, target_ms: float = 0.0, gauge: Any = None):
        if target_ms < 0:
            raise ValueError(f"serve.target_latency_ms must be >= 0, got {target_ms}")
        if target_ms > 0 and cap <= 0:
            raise ValueError("serve.target_latency_ms needs an in-flight cap to adapt under (serve.max_inflight)")
        self.cap, self.target_s, self.gauge = cap, target_ms / 1e3, gauge
        self.limit = float(cap)
        self._window: list[float] = []
        self._opened = 0.0
        self._peak = 0  # most requests in flight since the window opened
        self._publish()

    def admits(self, inflight: int) -> bool:
        """Whether one more may be admitted with ``inflight`` already in progress."""
        ok = not self.cap or inflight < int(self.limit)
        self._peak = max(self._peak, inflight + 1 if ok else inflight)
        return ok

    def observe(self, latency_s: float, now: float | None = None) -> None:
        """One admitted request answered (200) after ``latency_s``; ``now``: a monotonic
        clock in seconds (default ``time.perf_counter()``)."""
        if not self.target_s:
            return
        now = time.perf_counter() if now is None else now
        w = self._window
        if not w:
            self._opened = now
        w.append(latency_s)
        if len(w) < max(8, int(self.limit)) or now - self._opened < self.WINDOW_S:
            return
        w.sort()
        p90 = w[(9 * (len(w) - 1)) // 10]
        w.clear()
        if p90 <= self.target_s:
            self.limit = min(float(self.cap), self.limit + max(1.0, 0.1 * self.limit))
        elif self._peak >= self.BINDING * int(self.limit):
            self.limit = max(float(min(self.MIN, self.cap)), self.limit * max(0.5, self.target_s / p90))
        self._peak = 0
        self._publish()

    def _publish(self) -> None:
        if self.gauge is not None:
            self.gauge.set(int(self.limit) if self.cap else 0)


# --------------------------------------------------------------------------- middleware


class ServeApp(FastAPI):
    """The FastAPI app with ``ServeMiddleware`` in front of all of it: a request meets our
    middleware (limits, shedding, metrics, the lean routes) first, and only what it passes on
    goes through FastAPI's own middleware stack (error handler, telemetry, body limit) and
    routing. Registered with ``add_middleware`` it ran inside that stack, which then wrapped
    every lean request for nothing. Our middleware's own failures never leave as a stack
    trace: the lean routes answer their errors themselves, everything else is handled
    inside."""

    front: "ServeMiddleware"

    async def __call__(self, scope, receive, send) -> None:
        await self.front(scope, receive, send)



class ServeMiddleware:
    """Pure ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware):

    * refuses a body over ``limit`` bytes with 413, whether announced by Content-Length or
      streamed (chunked), and a declared media type other than JSON with 415 -- before the
      app parses anything;
    * sheds load early: while the batcher's queue is full, or the event loop lags more than
      ``serve.max_loop_lag_ms`` (requests are piling up unread in the socket buffers), a model
      request is refused with 503 before its body is even parsed (parsing is what an
      overloaded CPU can least afford);
    * records each request's latency and status in the metrics (endpoint = method + path,
      "other" for unknown paths, so label cardinality stays bounded).
    """

    KNOWN = frozenset({"/v1/recommend", "/v1/rank", "/v1/items", "/healthz", "/readyz", "/metrics"})
    QUEUED = frozenset({"/v1/recommend", "/v1/rank"})

    def __init__(self, app, limit: int, metrics: ServeMetrics, queue_full: Callable[[], bool] = lambda: False,
                 overloaded: Callable[[], bool] = lambda: False, inflight_limit: InflightLimit | None = None,
                 lean: "LeanRoutes | None" = None):
        self.app, self.limit, self.metrics, self.queue_full = app, limit, metrics, queue_full
        self.lean = lean  # answers POST on QUEUED paths itself (serve.lean_routes)
        self.overloaded = overloaded
        # model requests admitted and not yet answered: how many may be (cap 0: no limit)
        self.inflight_limit = inflight_limit or InflightLimit(0)
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = f"{scope['method']} {path}" if path in self.KNOWN else "other"
        status = [500]

        async def send_observed(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                self.metrics.errors.labels(refusal.kind).inc()
                headers = {"Retry-After": "1"} if refusal.status == 503 else None
                await _error(refusal.status, refusal.kind, refusal.message, refusal.field, headers)(
                    scope, receive, send_observed)
            elif path in self.QUEUED:
                self.inflight += 1  # one event loop: no lock needed
                try:
                    if self.lean is not None and scope["method"] == "POST":
                        await self.lean(scope, receive, send_observed)  # it applies the size limit itself
                    else:
                        await self.app(scope, self._limited(receive), send_observed)
                finally:
                    self.inflight -= 1
                if status[0] == 200:
                    self.inflight_limit.observe(time.perf_counter() - t0)
            else:
                await self.app(scope, self._limited(receive), send_observed)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope) -> ServeError | None:
        if scope["path"] in self.QUEUED:
            if not self.inflight_limit.admits(self.inflight):
                return _Refused(503, "busy", f"{self.inflight} requests in progress (limit "
                                f"{int(self.inflight_limit.limit)}: serve.max_inflight / serve.target_latency_ms); "
                                "retry later", None)
            if self.queue_full():
                return _Refused(503, "queue_full", "request queue full; retry later", None)
            if self.overloaded():
                return _Refused(503, "overloaded", "server overloaded (requests arrive faster than it can read "
                                "them); retry later", None)
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limit:
            return _Refused(413, "body_too_large", f"body: at most {self.limit} bytes")
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if scope["method"] in ("POST", "PUT", "PATCH") and ctype and not _is_json(ctype):
            return _Refused(415, "unsupported_media_type",
                            f"body: Content-Type must be application/json, got {ctype[:64]!r}")
        return None

    def _limited(self, receive):
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    self.metrics.errors.labels("body_too_large").inc()
                    # An HTTPException, so FastAPI's body reader passes it on (as a 413).
                    raise _TooLarge(413, f"body: at most {self.limit} bytes")
            return msg

        return limited_receive


class _Refused(ServeError):
    def __init__(self, status: int, kind: str, message: str, field: str | None = "body"):
        super().__init__(message, field)
        self.status, self.kind = status, kind


def _is_json(ctype: str) -> bool:
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


class _TooLarge(StarletteHTTPException):
    pass


# --------------------------------------------------------------------------- lean routes


class LeanRoutes:
    """``POST /v1/recommend`` and ``POST /v1/rank`` answered as a plain ASGI handler, past the
    framework's routing, dependency solving and response classes (``serve.lean_routes``).

    Under load most of an HTTP process's CPU went to that machinery rather than to the
    request (README, Known limits). This handler does the same work with less: it reads the
    body under the size limit, validates it with the very pydantic model the FastAPI route
    declares (``model_validate_json``: parsed and checked in one pass), calls the backend
    with the same arguments (``schemas.request_args``), and writes the answer with orjson.
    Errors leave in the same format, with the same status, type and field as through FastAPI
    (tests send every malformed-request class, and random bodies, both ways); the wording
    can differ (JSON mode says "array" where FastAPI's validation of the parsed object says
    "list"). The FastAPI routes stay registered: they carry the OpenAPI schema, and answer
    these paths when ``serve.lean_routes`` is false."""

    def __init__(self, backend: Any, schemas: Any, metrics: RequestMetrics, limit: int):
        self.routes = {"/v1/recommend": (schemas.RecommendRequest, backend.recommend),
                       "/v1/rank": (schemas.RankRequest, backend.rank)}
        self.metrics, self.limit = metrics, limit

    async def __call__(self, scope, receive, send) -> None:
        model, call = self.routes[scope["path"]]
        try:
            body = await self._body(receive)
            if body is None:  # the client went away before sending it all
                return
            if not body:  # what FastAPI answers for a missing body
                return await self._error(send, 422, "invalid_request", "body: Field required", "body")
            try:
                req = model.model_validate_json(body)
            except ValidationError as e:
                return await self._error(send, *validation_failure(e.errors(include_url=False)))
            t0 = time.perf_counter()
            out = await call(S.request_args(req))
            out["latency_ms"] = 1e3 * (time.perf_counter() - t0)
            await _send_json(send, 200, orjson.dumps(out))
        except ServeError as e:
            await self._error(send, e.status, e.kind, e.message, e.field)
        except Exception as e:  # noqa: BLE001 -- logged with a reference; the client gets a 500 body
            await self._error(send, 500, "internal", internal_failure(scope["method"], scope["path"], e))

    async def _body(self, receive) -> bytes | None:
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None  # http.disconnect
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise _Refused(413, "body_too_large", f"body: at most {self.limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _error(self, send, status: int, kind: str, message: str, field: str | None = None) -> None:
        self.metrics.errors.labels(kind).inc()
        body: dict[str, Any] = {"type": kind, "message": message}
        if field is not None:
            body["field"] = field
        await _send_json(send, status, orjson.dumps({"error": body}),
                         retry_after=status == 503)


async def _send_json(send, status: int, payload: bytes, retry_after: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})

"""Front ends that resolve requests with a catalogue copy (serve.resolve_in_frontends):
packed histories and candidates give exactly the answers and errors of the engine's own
parsing; what the copy cannot resolve falls back to it; malformed packed values are refused
as bad frames, never served."""

import asyncio
import base64
import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from genrec_jax.serve import ipc
from genrec_jax.serve import schemas as S
from genrec_jax.serve.app import Service
from genrec_jax.serve.errors import RemoteError, ServeError
from genrec_jax.serve.frontend import RemoteEngine
from genrec_jax.serve.inputs import Catalog, History
from genrec_jax.serve.metrics import EngineMetrics, RequestMetrics

from .conftest import events

LIMIT = 1 << 22


class Pair:
    """One engine process's socket server over the session engine, and a front end's
    ``RemoteEngine`` with its catalogue copy, in one event loop in a background thread."""

    def __init__(self, engine, cfg):
        self.cfg = cfg
        self.schemas = S.build_schemas(cfg)
        self.n = 0
        self.svc = Service(cfg, lambda: engine, EngineMetrics())
        self.svc.start()
        self.dir = tempfile.mkdtemp(prefix="rs-")
        self.loop = asyncio.new_event_loop()
        import threading

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    async def _start(self):
        path = str(Path(self.dir) / "e.sock")
        self.server = await ipc.EngineServer(self.svc, path, LIMIT).start()
        self.client = ipc.EngineClient(path, LIMIT)
        self.remote = RemoteEngine(self.cfg, self.client, RequestMetrics())
        await self.remote.load_catalog()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, route: str, body: dict, resolve: bool):
        """(answer or error tuple, the args sent) for a body through the front end's path
        (resolving with its copy, or with the copy switched off) to the engine process."""
        self.n += 1
        if body.get("user_id"):  # a new user each time: a cache hit would round differently
            body = dict(body, user_id=f"{body['user_id']}-{self.n}")
        model = self.schemas.RecommendRequest if route == "recommend" else self.schemas.RankRequest
        args = S.request_args(model.model_validate(body))
        saved = self.remote.catalog
        if not resolve:
            self.remote.catalog = None
        try:
            sent = self.remote.resolve(args, candidates=route == "rank")
            try:
                out = self.run(getattr(self.remote, route)(args))
            except ServeError as e:
                out = ("error", e.status, e.kind, e.field, e.message)
        finally:
            self.remote.catalog = saved
        return out, sent

    def close(self):
        async def stop():
            await self.client.close()
            await self.server.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.svc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(engine, serve_cfg):
    p = Pair(engine, dataclasses.replace(serve_cfg, http_workers=2))
    yield p
    p.close()


def test_the_copy_is_the_engines_catalogue(pair, engine):
    cat = pair.remote.catalog
    assert cat is not None, "the front end did not copy the catalogue"
    assert len(cat) == len(engine.catalog) and cat.action_names == engine.catalog.action_names
    for i in (1, 2, len(cat) // 2, len(cat)):
        assert cat.internal(engine.catalog.external(i), "x") == i


BODIES = [
    ("recommend", {"user_id": "r1", "history": events(["i3", "i9", "i27"]), "k": 7, "exclude_history": True,
                   "context": {"timestamp": 1_700_010_000}}),
    ("recommend", {"history": events(["i3", "i9"], actions=["view", "purchase"]), "k": 5, "exclude_items": ["i1"]}),
    ("recommend", {"history": [{"item_id": "i4"}, {"item_id": "i7"}], "k": 3}),  # no timestamps
    ("rank", {"history": events(["i3", "i9"]), "candidates": ["i5", "i6", "i100"]}),
    ("rank", {"user_id": "r2", "history": events(["i3"]), "candidates": ["i5", "i6", "i7"], "sort": True}),
]


@pytest.mark.parametrize("route,body", BODIES)
def test_resolved_answers_equal_the_engines_parsing(pair, route, body):
    got, sent = pair.call(route, body, resolve=True)
    want, raw = pair.call(route, body, resolve=False)
    assert "packed" in sent and sent["history"] is None, "a valid history should travel packed"
    if route == "rank":
        assert "packed_candidates" in sent
    assert "packed" not in raw
    assert got == want


def test_what_the_copy_cannot_resolve_goes_to_the_engine(pair, engine):
    full = pair.remote.catalog
    # A copy taken before the last items were registered (cold start): it lacks them.
    pair.remote.catalog = Catalog(["<pad>", *[full.external(i) for i in range(1, len(full) - 2)]], full.action_names)
    try:
        late = full.external(len(full))
        body = {"history": events(["i3", late]), "k": 4}
        got, sent = pair.call("recommend", body, resolve=True)
        assert "packed" not in sent, "an item the copy lacks must go as written"
        assert got == pair.call("recommend", body, resolve=False)[0]
        body = {"history": events(["i3"]), "candidates": ["i5", late]}
        got, sent = pair.call("rank", body, resolve=True)
        assert "packed" in sent and "packed_candidates" not in sent
        assert got == pair.call("rank", body, resolve=False)[0]
    finally:
        pair.remote.catalog = full


def event_strategy(known: int):
    item = st.one_of(st.integers(-2, known + 3).map(lambda i: f"i{i}"), st.integers(-2, known + 3),
                     st.sampled_from(["", "nope"]))
    return st.fixed_dictionaries({"item_id": item}, optional={
        "action": st.sampled_from(["view", "like", "buy"]),
        "timestamp": st.integers(0, 50)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_requests_get_the_same_answer_or_error_either_way(pair, engine, data):
    hist = data.draw(st.lists(event_strategy(len(engine.catalog)), min_size=0, max_size=70))
    route = data.draw(st.sampled_from(["recommend", "rank"]))
    body = {"history": hist}
    if data.draw(st.booleans()):
        body["context"] = {"timestamp": data.draw(st.integers(0, 60))}
    if route == "rank":
        body["candidates"] = data.draw(st.lists(st.sampled_from(["i1", "i2", 5, "zz"]), min_size=0, max_size=70))
    try:
        got, _ = pair.call(route, body, resolve=True)
    except ValidationError:
        return  # refused by the schema before either path
    want, _ = pair.call(route, body, resolve=False)
    assert got == want


def packed(items, actions=None, ts=None, req=None):
    items = np.asarray(items, np.int32)
    h = History.from_arrays(items, actions, ts, req)
    return ipc.pack_history(h)


def b64(a):
    return base64.b64encode(np.asarray(a).tobytes()).decode()


@pytest.mark.parametrize("bad,why", [
    ("not a list", "must be"),
    ([b64(np.int32([1])), b64(np.int32([0])), b64(np.int64([0]))], "must be"),  # no request time
    (["***", b64(np.int32([0])), b64(np.int64([0])), 0], "not base64"),
    ([b64(np.int8([1, 2, 3])), b64(np.int32([0])), b64(np.int64([0])), 0], "whole number"),
    ([b64(np.int32([1, 2])), b64(np.int32([0])), b64(np.int64([0, 0])), 0], "events"),
    ([b64(np.int32([])), b64(np.int32([])), b64(np.int64([])), 0], "events"),
    ("items0", "outside the catalogue"),
    ("items_past_end", "outside the catalogue"),
    ("action_past_end", "outside the catalogue"),
])
def test_malformed_packed_history_is_a_bad_frame(pair, engine, bad, why):
    n = len(engine.catalog)
    if bad == "items0":
        bad = packed([0, 1])
    elif bad == "items_past_end":
        bad = packed([1, n + 1])
    elif bad == "action_past_end":
        bad = packed([1], actions=[len(engine.catalog.action_names)])
    args = dict(S.request_args(pair.schemas.RecommendRequest.model_validate({"history": events(["i1"])})),
                history=None, packed=bad)
    with pytest.raises(RemoteError) as e:
        pair.run(pair.client.call("recommend", args, 10))
    assert (e.value.status, e.value.kind) == (400, "bad_frame") and why in e.value.message


def test_malformed_packed_candidates_are_a_bad_frame(pair, engine):
    base = S.request_args(pair.schemas.RankRequest.model_validate({"history": events(["i1"]), "candidates": ["i1"]}))
    for ids in ([0], [len(engine.catalog) + 1], []):
        args = dict(base, candidates=None, packed_candidates=b64(np.int32(ids)))
        with pytest.raises(RemoteError) as e:
            pair.run(pair.client.call("rank", args, 10))
        assert (e.value.status, e.value.kind) == (400, "bad_frame")


def test_pack_round_trip():
    rng = np.random.default_rng(1)
    for n in (1, 7, 300):
        h = History(rng.integers(1, 50, n).astype(np.int32), rng.integers(0, 3, n).astype(np.int32),
                    np.sort(rng.integers(0, 2**40, n)).astype(np.int64), 2**40 + 5)
        back = ipc.unpack_history(ipc.pack_history(h), max_events=1024, num_items=50, num_actions=3)
        for f in ("items", "actions", "timestamps"):
            assert np.array_equal(getattr(back, f), getattr(h, f)) and getattr(back, f).dtype == getattr(h, f).dtype
        assert back.request_ts == h.request_ts
        ids = rng.integers(1, 50, n).astype(np.int32)
        assert np.array_equal(ipc.unpack_ids(ipc.pack_ids(ids), max_ids=1024, num_items=50), ids)

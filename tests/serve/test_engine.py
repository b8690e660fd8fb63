"""Engine: bucketed, compiled steps agree with the model run directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.serve.engine import RankJob, Recommendation, RecommendJob
from genrec_jax.serve.errors import Conflict, NotReady, RequestError
from genrec_jax.serve.inputs import History, pad_batch
from genrec_jax.train.step import candidate_features

from .conftest import events


def histories(n, rng, lo=1, hi=30):
    out = []
    for _ in range(n):
        m = int(rng.integers(lo, hi))
        ts = np.cumsum(rng.integers(0, 3000, m)) + 1_650_000_000
        out.append(History(rng.integers(1, 121, m).astype(np.int32), rng.integers(0, 5, m).astype(np.int32),
                           ts.astype(np.int64), int(ts[-1]) + 60))
    return out


_SCORE_FNS = {}


def reference_topk(model, hs, k, max_len, exclude=None):
    """Scores of the model run directly (one jit for every call: faster than op by op)."""
    rows = 8  # one padded shape, one compile
    b = {key: jnp.asarray(v) for key, v in pad_batch(hs, rows, max_len, max_len).items()}
    if id(model) not in _SCORE_FNS:
        def score(b):
            states, _ = model.encode(b)
            return model.score_items(model.user_vectors(model.last_states(states, b["lengths"])))

        _SCORE_FNS[id(model)] = jax.jit(score)
    scores = np.array(_SCORE_FNS[id(model)](b))[:len(hs)]
    scores[:, 0] = -np.inf
    if exclude is not None:
        for i, ex in enumerate(exclude):
            scores[i, ex] = -np.inf
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, 1)


def test_recommend_batch_matches_model(engine, rng):
    hs = histories(6, rng)  # 6 rows: buckets 4 + 4 (padded), windows truncated at max_len
    ids, scores = engine.recommend_batch(hs, k=10)
    ref_ids, ref_scores = reference_topk(engine._model, hs, 10, engine.max_len)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ids, ref_ids)


def test_anonymous_direct_step_equals_the_pool_path(engine, rng):
    """Anonymous retrieval rows skip the K/V pool (one encode + top-k step); rows with a
    user id go through prefill + retrieve. Same windows, same answers -- in one mixed batch."""
    assert engine.cfg.direct_recommend
    hs = histories(5, rng)
    ex = [np.unique(h.items)[:2] for h in hs]
    anon = [RecommendJob(h, 10, exclude=e) for h, e in zip(hs, ex)]
    named = [RecommendJob(h, 10, exclude=e, user_id=f"direct-vs-pool-{i}") for i, (h, e) in enumerate(zip(hs, ex))]
    calls = []
    engine.on_call, old = (lambda step, rows, bucket: calls.append(step)), engine.on_call
    try:
        out = engine.process(anon + named)
    finally:
        engine.on_call = old
        for j in named:
            engine.prefix.discard(j.user_id)
    assert "recommend" in calls and "prefill" in calls and "retrieval" in calls, calls
    for a, b in zip(out[:5], out[5:]):
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(a.scores))


def test_exclusions_applied_in_step(engine, rng):
    hs = histories(3, rng)
    ex = [np.unique(h.items) for h in hs]
    ids, _ = engine.recommend_batch(hs, k=10, exclude=ex)
    for row, e in zip(ids, ex):
        assert not set(row.tolist()) & set(e.tolist()), "an excluded item was recommended"
    ref_ids, _ = reference_topk(engine._model, hs, 10, engine.max_len, exclude=ex)
    np.testing.assert_array_equal(ids, ref_ids)


def test_recommend_in_process_api(engine):
    out = engine.recommend(events(["i3", "i5", "i8"]), k=4, exclude_history=True, exclude_items=["i1"])
    assert len(out) == 4 and all(o["item_id"] not in {"i1", "i3", "i5", "i8"} for o in out)
    assert [o["score"] for o in out] == sorted((o["score"] for o in out), reverse=True)


def test_rank_equals_full_sequence_m_falcon(engine, rng):
    """Cached history + candidate micro-batches == one full pass with candidates appended."""
    model = engine._model
    h = histories(1, rng, lo=8, hi=12)[0]
    h = History(h.items, h.actions, h.timestamps, int(h.timestamps[-1]))  # request at the last event: gap 0
    cands = rng.integers(1, 121, 40).astype(np.int32)  # 3 micro-batches of 16
    got = engine.process([RankJob(h, cands)])[0]
    n, c = len(h), len(cands)
    rel = (h.timestamps - h.timestamps[0]).astype(np.int32)
    req = h.request_ts - int(h.timestamps[0])
    batch = {
        "items": np.concatenate([h.items, cands])[None],
        "actions": np.concatenate([h.actions, np.full(c, engine.unknown_action)])[None].astype(np.int32),
        "timestamps": np.concatenate([rel, np.full(c, req)])[None].astype(np.int32),
        "query_timestamps": np.concatenate([rel[1:], [req], np.full(c, req)])[None].astype(np.int32),
        "lengths": np.array([n + c], np.int32), "num_targets": np.array([c], np.int32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def full_pass(batch):
        states, _ = model.encode(batch)
        return jax.nn.sigmoid(model.tasks(*candidate_features(model, states, batch)))

    probs = np.asarray(full_pass(batch))[0, n:]
    for t, name in enumerate(engine.task_names):
        np.testing.assert_allclose(got.scores[name], probs[:, t], rtol=1e-4, atol=1e-5, err_msg=name)


def test_rank_does_not_depend_on_candidate_order(engine, rng):
    h = histories(1, rng)[0]
    cands = rng.integers(1, 121, 30).astype(np.int32)
    a = engine.process([RankJob(h, cands)])[0]
    b = engine.process([RankJob(h, cands[::-1].copy())])[0]
    for name in a.scores:
        np.testing.assert_allclose(a.scores[name], b.scores[name][::-1], rtol=1e-5, atol=1e-6, err_msg=name)


def test_mixed_batch_matches_single_requests(engine, rng):
    hs = histories(3, rng)
    cands = rng.integers(1, 121, 5).astype(np.int32)
    jobs = [RecommendJob(hs[0], 5), RankJob(hs[1], cands), RecommendJob(hs[2], 3)]
    together = engine.process(jobs)
    for job, res in zip(jobs, together):
        alone = engine.process([job])[0]
        if isinstance(job, RankJob):
            np.testing.assert_allclose(res.scores["retrieval"], alone.scores["retrieval"], rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(res.items, alone.items)


def test_job_validation(engine):
    with pytest.raises(RequestError, match="^k:"):
        engine.recommend_job(events(["i1"]), k=0)
    with pytest.raises(Conflict, match="no semantic-ID decoder"):
        engine.recommend_job(events(["i1"]), k=3, mode="generative")
    with pytest.raises(RequestError, match="^candidates:"):
        engine.rank_job(events(["i1"]), [])
    with pytest.raises(RequestError, match=r"^exclude_items\[0\]:"):
        engine.recommend_job(events(["i1"]), k=3, exclude_items=["nope"])
    with pytest.raises(RequestError, match=r"^items\[0\]\.features:"):
        engine.add_items([{"item_id": "new", "features": [0.0]}])


def test_compiled_once_no_compile_on_requests(engine, rng):
    before = engine.compiles
    engine.recommend_batch(histories(5, rng, hi=60), k=3)
    assert engine.compiles == before == len(engine.executables())
    engine.ready = False
    try:
        with pytest.raises(NotReady):
            engine.process([RecommendJob(histories(1, rng)[0], 1)])
    finally:
        engine.ready = True


def test_host_spans_account_for_the_batch(engine, rng):
    """Opt-in host timing: every phase recorded, the phases fit inside the total."""
    engine.host_spans = {}
    try:
        engine.process([RecommendJob(h, 5) for h in histories(3, rng)])
        spans = dict(engine.host_spans)
    finally:
        engine.host_spans = None
    assert spans["batches"] == 1
    parts = [spans[k] for k in ("dispatch", "wait", "fetch", "results")]
    assert all(p >= 0 for p in parts) and spans["total"] > 0
    assert sum(parts) <= spans["total"] + 1e-6


def test_warmup_runs_every_executable_and_keeps_cached_users(engine, rng):
    """Warm-up executes each compiled step once (a GPU executable's first run loads its
    kernels); it writes only the pool's padding slot, so a cached user's answer is unchanged."""
    h = histories(1, rng, lo=10, hi=20)[0]
    uid = "warm-check"
    first = engine.process([RecommendJob(h, 5, user_id=uid)])[0]
    calls = {}
    saved = dict(engine._exec)

    class Counting:
        def __init__(self, key, exe):
            self.key, self.exe = key, exe

        def __call__(self, *args):
            calls[self.key] = calls.get(self.key, 0) + 1
            return self.exe(*args)

    engine._exec.update({key: Counting(key, exe) for key, exe in saved.items()})
    try:
        engine._run_every_executable()
    finally:
        engine._exec.update(saved)
    assert calls == {key: 1 for key in saved}
    hits = engine.prefix.hits
    again = engine.process([RecommendJob(h, 5, user_id=uid)])[0]
    assert engine.prefix.hits == hits + 1  # answered from the cache, after the zero-input runs
    np.testing.assert_array_equal(again.items, first.items)
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-5, atol=1e-6)
    engine.prefix.discard(uid)


def test_batches_dispatched_before_earlier_ones_are_collected_answer_as_one_at_a_time(engine, rng):
    """The pipelined batcher dispatches batch n + 1 before collecting batch n. A returning
    user's second batch extends the prefix the first batch is still writing, and every
    batch writes the scratch slots: the device must apply them in dispatch order."""
    hs = histories(3, rng, lo=6, hi=15)  # within the window (max_len 16): the newer one extends the older
    uids = [f"pipelined-{i}" for i in range(3)]
    cut = [len(h.items) - 2 for h in hs]
    older = [History(h.items[:c], h.actions[:c], h.timestamps[:c], int(h.timestamps[c - 1]) + 60)
             for h, c in zip(hs, cut)]
    hits = engine.prefix.hits
    try:
        first = engine.dispatch([RecommendJob(o, 5, user_id=u) for o, u in zip(older, uids)]
                                + [RankJob(hs[0], np.arange(1, 40, dtype=np.int32))])
        second = engine.dispatch([RecommendJob(h, 5, user_id=u) for h, u in zip(hs, uids)]
                                 + [RecommendJob(h, 5) for h in hs])
        third = engine.dispatch([RecommendJob(o, 5) for o in older])
        got_third, got_second, got_first = engine.collect(third), engine.collect(second), engine.collect(first)
        assert engine.prefix.hits == hits + 3, "the second batch must extend the first batch's prefixes"
    finally:
        for u in uids:
            engine.prefix.discard(u)
    want_first = engine.process([RecommendJob(o, 5) for o in older] + [RankJob(hs[0], np.arange(1, 40, dtype=np.int32))])
    want_second = engine.process([RecommendJob(h, 5) for h in hs] * 2)
    for got, want in ((got_first, want_first), (got_second, want_second), (got_third, want_first[:3])):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if isinstance(w, Recommendation):
                np.testing.assert_array_equal(g.items, w.items)
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)
            else:
                for name in w.scores:
                    np.testing.assert_allclose(g.scores[name], w.scores[name], rtol=1e-4, atol=1e-5)

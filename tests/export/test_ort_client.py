"""End to end: the ONNX Runtime reference client returns what the XLA serving engine does."""

from __future__ import annotations

import numpy as np
import pytest

from genrec_jax.config import ServeConfig

K = 10
ENGINE_SERVE = dict(batch_buckets=[25], seq_buckets=[16], extend_buckets=[1], rank_micro_batch=8, max_candidates=8,
                    max_exclude=32, prefix_cache_users=0, beam_width=12, max_k=20)


def _histories(batch, n=100):
    from genrec_jax.serve.inputs import History

    out = []
    for r in range(n):
        L = int(batch["lengths"][r])
        if L == 0:
            continue
        out.append(History.from_arrays(batch["items"][r, :L], batch["actions"][r, :L], batch["timestamps"][r, :L],
                                       request_ts=int(batch["query_timestamps"][r, L - 1])))
    return out


def _engine(model, tm):
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.inputs import Catalog

    return Engine(model, Catalog(tm.item_ids, tm.info.get("action_names", ())), ServeConfig(**ENGINE_SERVE))


@pytest.fixture(scope="module")
def engine(tiny_trained):
    return _engine(tiny_trained.model, tiny_trained)


@pytest.fixture(scope="module")
def histories(real_batch):
    h = _histories(real_batch)
    assert len(h) == 100
    return h


def _feeds(histories, max_len):
    from genrec_jax.serve.inputs import pad_batch

    return pad_batch(histories, len(histories), max_len, max_len)


def test_retrieval_top_k_equals_engine_for_100_users(tiny_export, engine, histories):
    from genrec_jax.export.ort_client import OnnxRecommender

    out, _, _ = tiny_export
    client = OnnxRecommender(out)
    feeds = _feeds(histories, engine.max_len)
    ids, scores = client.retrieve(feeds, k=K)
    want_ids, want_scores = engine.recommend_batch(histories, k=K, mode="retrieval")
    assert np.array_equal(ids, want_ids), "ONNX retrieval top-k differs from the engine's"
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


def test_retrieval_with_history_excluded_equals_engine(tiny_export, engine, histories):
    from genrec_jax.export.ort_client import OnnxRecommender

    out, _, _ = tiny_export
    client = OnnxRecommender(out)
    sub = histories[:25]
    exclude = [np.unique(h.items) for h in sub]
    ids, _ = client.retrieve(_feeds(sub, engine.max_len), k=K, exclude=exclude)
    want, _ = engine.recommend_batch(sub, k=K, mode="retrieval", exclude=exclude)
    assert np.array_equal(ids, want)
    assert not any(np.isin(ids[i], exclude[i]).any() for i in range(len(sub))), "an excluded item came back"


def test_ranker_scores_equal_engine(tiny_export, engine, histories):
    from genrec_jax.export.ort_client import OnnxRecommender
    from genrec_jax.serve.engine import RankJob

    out, _, _ = tiny_export
    client = OnnxRecommender(out)
    rng = np.random.default_rng(0)
    sub = histories[:25]
    cands = rng.integers(1, engine.num_items + 1, (len(sub), 6)).astype(np.int32)
    feeds = _feeds(sub, engine.max_len)
    req = np.array([h.request_ts - int(h.timestamps[0]) for h in sub], np.int32)
    got = client.rank(feeds, cands, req)
    res = engine.process([RankJob(h, cands[i]) for i, h in enumerate(sub)])
    for t, name in enumerate(engine.task_names):
        want = np.stack([r.scores[name] for r in res])
        np.testing.assert_allclose(got["task_scores"][..., t], want, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["retrieval_logits"], np.stack([r.scores["retrieval"] for r in res]),
                               rtol=1e-4, atol=1e-4)


def test_ranker_scores_do_not_depend_on_candidate_order(tiny_export, histories):
    from genrec_jax.export.ort_client import OnnxRecommender

    out, _, _ = tiny_export
    client = OnnxRecommender(out)
    sub = histories[:4]
    feeds = _feeds(sub, 16)
    req = np.array([h.request_ts - int(h.timestamps[0]) for h in sub], np.int32)
    cands = np.tile(np.arange(1, 7, dtype=np.int32), (len(sub), 1))
    a = client.rank(feeds, cands, req)["task_scores"]
    b = client.rank(feeds, cands[:, ::-1].copy(), req)["task_scores"][:, ::-1]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_generative_top_k_equals_jax_engine_for_100_users(decoder_export, decoder_model, tiny_trained, histories):
    """Encoder + beam search over decode_step.onnx (NumPy driver, trie side file) returns the
    serving engine's generative top-k."""
    from genrec_jax.export.ort_client import OnnxRecommender

    client = OnnxRecommender(decoder_export.out_dir)
    eng = _engine(decoder_model, tiny_trained)
    feeds = _feeds(histories, eng.max_len)
    ids, scores = client.recommend(feeds, k=K, beam_width=eng.beam_width)
    want_ids, want_scores = eng.recommend_batch(histories, k=K, mode="generative")
    assert np.array_equal(ids, want_ids), "ONNX beam search top-k differs from the engine's"
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    # the same with items excluded
    exclude = [np.unique(h.items) for h in histories[:25]]
    ids, _ = client.recommend(_feeds(histories[:25], eng.max_len), k=K, beam_width=eng.beam_width, exclude=exclude)
    want_ids, _ = eng.recommend_batch(histories[:25], k=K, mode="generative", exclude=exclude)
    assert np.array_equal(ids, want_ids)


@pytest.mark.parametrize("renormalize", [False, True])
def test_beam_search_equals_jax_driver(decoder_export, decoder_model, real_batch, renormalize):
    import jax.numpy as jnp

    from genrec_jax.export.ort_client import OnnxRecommender
    from genrec_jax.semantic_ids.beam_search import recommend
    from genrec_jax.semantic_ids.trie import Trie

    client = OnnxRecommender(decoder_export.out_dir)
    feeds = {k: real_batch[k][:16] for k in ("items", "actions", "timestamps", "query_timestamps", "lengths")}
    trie = Trie.from_item_codes(np.asarray(decoder_model.item_codes[...]), decoder_model.decoder.code_sizes)
    items, scores = client.beam_search(client.encode(feeds), k=5, beam_width=6, renormalize=renormalize)
    import jax

    fn = jax.jit(lambda b: recommend(decoder_model, trie, b, beam_width=6, k=5, renormalize=renormalize))
    want_items, want_scores = fn({k: jnp.asarray(v) for k, v in feeds.items()})
    assert np.array_equal(items, np.asarray(want_items))
    np.testing.assert_allclose(scores, np.asarray(want_scores), rtol=1e-4, atol=1e-4)


def test_fp16_client_retrieval_mostly_agrees(tiny_export, histories):
    """The fp16 graphs rank nearly alike (scores within 1e-2 relative; ties may swap)."""
    from genrec_jax.export.ort_client import OnnxRecommender

    out, _, _ = tiny_export
    feeds = _feeds(histories, 16)
    a, sa = OnnxRecommender(out).retrieve(feeds, k=K)
    b, sb = OnnxRecommender(out, precision="fp16").retrieve(feeds, k=K)
    assert np.abs(sa - sb).max() <= 1e-2 * np.abs(sa).max()
    assert np.mean(a == b) > 0.8


@pytest.mark.parametrize("mode", ["item", "prefix"])
def test_repeat_aware_beam_search_equals_jax_driver(decoder_export, decoder_model, real_batch, mode):
    """A repeat-aware export (manifest model.repeat_bias / repeat_mode) adds the offsets in
    the NumPy driver from the history's semantic IDs (side/item_codes.npy): same beams as
    the JAX driver with the same offsets. The decode_step graph itself is unchanged by the
    option."""
    import jax
    import jax.numpy as jnp

    from genrec_jax.export.ort_client import OnnxRecommender
    from genrec_jax.semantic_ids.beam_search import beam_search
    from genrec_jax.semantic_ids.decoder import prefix_sizes
    from genrec_jax.semantic_ids.trie import Trie

    offsets = np.array([0.7, -1.2, -25.0], np.float32)
    client = OnnxRecommender(decoder_export.out_dir)
    client.manifest.model.update(repeat_bias=offsets.tolist(), repeat_mode=mode)
    feeds = {k: real_batch[k][:16] for k in ("items", "actions", "timestamps", "query_timestamps", "lengths")}
    with pytest.raises(ValueError, match="repeat-aware"):
        client.beam_search(client.encode(feeds), k=5, beam_width=6)
    items, scores = client.recommend(feeds, k=5, beam_width=6)
    table = jnp.asarray(decoder_model.item_codes[...])
    trie = Trie.from_item_codes(np.asarray(table), decoder_model.decoder.code_sizes)

    @jax.jit
    def want_fn(b):
        dec = decoder_model.decoder
        states, _ = decoder_model.encode(b)
        add = lambda lg, t, seen: lg + jnp.asarray(offsets)[t] * seen  # noqa: E731
        marks = jnp.take(prefix_sizes(table), b["items"], axis=0) == 1 if mode == "item" else None
        history = (add, jnp.take(table, b["items"], axis=0), b["items"] > 0, marks)
        return beam_search(dec.prefill, dec.decode_step, dec.init_cache, trie, states, b["lengths"], beam_width=6,
                           k=6, history=history)

    want_items, want_scores = map(np.asarray, want_fn({k: jnp.asarray(v) for k, v in feeds.items()}))
    assert np.array_equal(items, want_items[:, :5])
    np.testing.assert_allclose(scores, want_scores[:, :5], rtol=1e-4, atol=1e-4)
    for r in range(16):
        assert not np.isin(items[r], feeds["items"][r][feeds["items"][r] > 0]).any(), "a history item came back"

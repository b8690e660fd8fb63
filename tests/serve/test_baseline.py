"""NaiveEngine (every optimisation off, the benchmarks' baseline) answers exactly what the
engine answers: the benchmark compares speed, not different math."""

import numpy as np

from genrec_jax.serve.baseline import NaiveEngine
from genrec_jax.serve.engine import RankJob, RecommendJob
from genrec_jax.serve.inputs import History

from .test_generative import hist


def test_naive_matches_engine(engine):
    naive = NaiveEngine(engine._model, rank_micro_batch=16)
    h = hist(14, seed=3)
    h = History(h.items, h.actions, h.timestamps, int(h.timestamps[-1]))  # request at the last event
    ids, scores = naive.recommend(h, 10)
    rec = engine.process([RecommendJob(h, 10)])[0]
    np.testing.assert_array_equal(ids, rec.items)
    np.testing.assert_allclose(scores, rec.scores, rtol=1e-4, atol=1e-4)
    cands = np.random.default_rng(0).integers(1, 121, 16).astype(np.int32)
    got = naive.rank(h, cands)
    ref = engine.process([RankJob(h, cands)])[0]
    for name in ref.scores:
        np.testing.assert_allclose(got[name], ref.scores[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_no_cache_beam_search_matches_engine(gen_engine):
    """The engine's cached beam search (pool states -> decoder memory, KV-cached decode)
    equals the one that recomputes every level and the cross-attention K/V per step."""
    naive = NaiveEngine(gen_engine._model, beam_width=gen_engine.beam_width, trie=gen_engine.semantic.trie)
    h = hist(10, seed=4)
    ids, scores = naive.recommend(h, 8, mode="generative")
    rec = gen_engine.process([RecommendJob(h, 8, "generative")])[0]
    np.testing.assert_array_equal(ids, rec.items)
    np.testing.assert_allclose(scores, rec.scores, rtol=1e-4, atol=1e-4)

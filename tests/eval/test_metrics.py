"""Hand-computed and property tests for genrec_jax.eval.metrics."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.eval.metrics import (
    MetricAccumulator,
    coverage,
    gini_index,
    intra_list_diversity,
    novelty,
    rank_metrics,
    ranks_from_scores,
    ranks_from_scores_jax,
)

# ------------------------------------------------------------------------------------------
# ranks_from_scores
# ------------------------------------------------------------------------------------------


def test_ranks_hand_computed():
    # N = 4 items (columns 1..4), column 0 padding with a huge score that must be ignored.
    scores = np.array(
        [
            [99.0, 0.1, 0.9, 0.5, 0.3],  # target 2 (0.9): nobody >= 0.9            -> rank 0
            [99.0, 0.1, 0.9, 0.5, 0.3],  # target 4 (0.3): 0.9, 0.5 >= 0.3           -> rank 2
            [99.0, 0.5, 0.5, 0.5, 0.1],  # target 1 (0.5): items 2, 3 tie (pessimistic) -> rank 2
            [99.0, 0.2, 0.2, 0.2, 0.2],  # constant scorer, target 3: the other 3 tie -> rank 3 = N-1
        ]
    )
    targets = np.array([2, 4, 1, 3])
    np.testing.assert_array_equal(ranks_from_scores(scores, targets), [0, 2, 2, 3])


def test_ranks_exclude_and_target_never_excluded():
    scores = np.array([[0.0, 0.9, 0.8, 0.7, 0.1]])
    targets = np.array([3])
    # Without exclusion: items 1 (0.9), 2 (0.8) beat 0.7 -> rank 2.
    assert ranks_from_scores(scores, targets)[0] == 2
    # Exclude item 1 -> only item 2 beats -> rank 1.
    excl = np.array([[False, True, False, False, False]])
    assert ranks_from_scores(scores, targets, excl)[0] == 1
    # Excluding the target itself is ignored (still rank 2, target still ranked).
    excl_t = np.array([[True, False, False, True, False]])
    assert ranks_from_scores(scores, targets, excl_t)[0] == 2


def test_ranks_nan_raises():
    scores = np.array([[0.0, 0.5, np.nan, 0.1]])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(scores, np.array([1]))


def test_ranks_nan_in_padding_column_ignored():
    scores = np.array([[np.nan, 0.5, 0.2]])
    assert ranks_from_scores(scores, np.array([1]))[0] == 0


@pytest.mark.parametrize("bad", [0, 4, -1])
def test_ranks_bad_targets_raise(bad):
    with pytest.raises(ValueError):
        ranks_from_scores(np.zeros((1, 4)), np.array([bad]))


def test_ranks_shape_checks():
    with pytest.raises(ValueError):
        ranks_from_scores(np.zeros(4), np.array([1]))
    with pytest.raises(ValueError):
        ranks_from_scores(np.zeros((2, 4)), np.array([1]))
    with pytest.raises(ValueError):
        ranks_from_scores(np.zeros((1, 4)), np.array([1]), np.zeros((1, 3), bool))


def test_ranks_jax_hand_and_jit():
    scores = np.array([[9.0, 0.1, 0.9, 0.5, 0.3], [9.0, 0.5, 0.5, 0.5, 0.1]], np.float32)
    targets = np.array([4, 1])
    excl = np.array([[False, False, True, False, False], [False] * 5])
    f = jax.jit(ranks_from_scores_jax)
    np.testing.assert_array_equal(np.asarray(f(scores, targets, excl)), [1, 2])
    np.testing.assert_array_equal(np.asarray(ranks_from_scores_jax(scores, targets)), [2, 2])


def test_ranks_jax_nan_is_pessimistic():
    scores = np.array([[0.0, 0.5, np.nan, 0.1], [0.0, np.nan, 0.5, 0.1]], np.float32)
    # Row 0: target 1 (0.5), competitor NaN counts against -> rank 1 (item 2); item 3 below.
    # Row 1: target 1 is NaN -> every other real item beats it -> rank 2.
    r = np.asarray(jax.jit(ranks_from_scores_jax)(scores, np.array([1, 1]), None))
    np.testing.assert_array_equal(r, [1, 2])


# ------------------------------------------------------------------------------------------
# rank_metrics
# ------------------------------------------------------------------------------------------


def test_rank_metrics_hand_computed():
    ranks = np.array([0, 1, 4, 10])
    m = rank_metrics(ranks, ks=(1, 5))
    # HR@1 = [0<1] / 4 = 1/4 ; HR@5 = ranks 0, 1, 4 -> 3/4
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.75)
    assert m["Recall@5"] == m["HR@5"] and m["Recall@1"] == m["HR@1"]
    # NDCG@1 = (1/log2(2)) / 4 = 0.25
    assert m["NDCG@1"] == pytest.approx(0.25)
    # NDCG@5 = (1/log2 2 + 1/log2 3 + 1/log2 6) / 4 = (1 + 0.6309298 + 0.3868528) / 4
    assert m["NDCG@5"] == pytest.approx((1 + 0.6309298 + 0.3868528) / 4, rel=1e-6)
    # MRR = (1/1 + 1/2 + 1/5 + 1/11) / 4 = (1 + .5 + .2 + .0909091) / 4 = 0.4477273
    assert m["MRR"] == pytest.approx(0.4477273, rel=1e-6)
    assert set(m) == {"HR@1", "HR@5", "Recall@1", "Recall@5", "NDCG@1", "NDCG@5", "MRR"}


def test_rank_metrics_rejects_empty_and_negative():
    with pytest.raises(ValueError):
        rank_metrics(np.array([], np.int64))
    with pytest.raises(ValueError):
        rank_metrics(np.array([0, -1]))
    with pytest.raises(ValueError):
        rank_metrics(np.array([0]), ks=(0,))


# ------------------------------------------------------------------------------------------
# Beyond-accuracy metrics
# ------------------------------------------------------------------------------------------


def test_coverage_hand_computed():
    topk = np.array([[1, 2], [2, 3]])
    # distinct {1, 2, 3} of N = 6 -> 3/6
    assert coverage(topk, 6) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        coverage(np.array([[0, 1]]), 6)  # padding id
    with pytest.raises(ValueError):
        coverage(np.array([[7, 1]]), 6)  # beyond catalogue


def test_gini_hand_computed():
    # N = 4, all four items once: x = [1,1,1,1] -> sum_i (2i-5) * 1 = -3-1+1+3 = 0 -> G = 0.
    assert gini_index(np.array([[1, 2], [3, 4]]), 4) == pytest.approx(0.0)
    # N = 4, all on item 2: x sorted = [0,0,0,4] -> (2*4-5)*4 / (4*4) = 12/16 = 0.75 = (N-1)/N.
    assert gini_index(np.array([[2, 2], [2, 2]]), 4) == pytest.approx(0.75)
    # N = 3, counts item1=2, item2=1, item3=0: x sorted = [0,1,2], sum x = 3
    # sum (2i-4) x_i = (-2)*0 + 0*1 + 2*2 = 4 ; G = 4 / (3 * 3) = 0.444444
    assert gini_index(np.array([[1], [1], [2]]), 3) == pytest.approx(4 / 9)


def test_novelty_hand_computed():
    # N = 3, counts (index 0 ignored even if nonzero): item1=5, item2=1, item3=0; total = 6.
    pop = np.array([100, 5, 1, 0])
    # p(1) = (5+1)/(6+3) = 6/9, p(2) = 2/9, p(3) = 1/9.
    # lists [[1, 2], [3, 3]] -> mean(-log2(6/9), -log2(2/9), -log2(1/9), -log2(1/9))
    #   = (0.5849625 + 2.1699250 + 3.1699250 + 3.1699250) / 4 = 2.2736844
    assert novelty(np.array([[1, 2], [3, 3]]), pop) == pytest.approx(2.2736844, rel=1e-6)


def test_ild_hand_computed():
    vecs = np.array(
        [
            [0.0, 0.0],  # 0 padding
            [1.0, 0.0],  # 1
            [0.0, 2.0],  # 2  orthogonal to 1 -> distance 1
            [3.0, 0.0],  # 3  parallel to 1 -> distance 0
            [0.0, 0.0],  # 4  zero vector -> cosine 0 -> distance 1 to anything
            [1.0, 1.0],  # 5  cos(1,5) = 1/sqrt2
        ]
    )
    # list [1, 2, 3]: pairs (1,2)=1, (1,3)=0, (2,3)=1 -> mean 2/3
    # list [1, 4]: pair (1,4)=1 -> 1
    # ILD = (2/3 + 1) / 2 = 5/6
    assert intra_list_diversity(np.array([[1, 2, 3]]), vecs) == pytest.approx(2 / 3)
    assert intra_list_diversity(np.array([[1, 4]]), vecs) == pytest.approx(1.0)
    # list [1, 5]: 1 - 1/sqrt(2) = 0.2928932
    assert intra_list_diversity(np.array([[1, 5]]), vecs) == pytest.approx(0.2928932, rel=1e-6)
    # Two lists of equal K averaged: ([1,2]=1, [1,3]=0) -> 0.5
    assert intra_list_diversity(np.array([[1, 2], [1, 3]]), vecs) == pytest.approx(0.5)
    # K = 1 has no pairs -> NaN
    assert math.isnan(intra_list_diversity(np.array([[1]]), vecs))


# ------------------------------------------------------------------------------------------
# MetricAccumulator
# ------------------------------------------------------------------------------------------


def _toy_vectors(n, d=3, seed=0):
    v = np.random.default_rng(seed).normal(size=(n + 1, d))
    v[0] = 0
    return v


def test_accumulator_matches_one_shot():
    rng = np.random.default_rng(0)
    n, k = 30, 4
    ranks = rng.integers(0, n, size=50)
    topk = np.stack([rng.choice(np.arange(1, n + 1), k, replace=False) for _ in range(50)])
    pop = rng.integers(0, 20, size=n + 1)
    vecs = _toy_vectors(n)

    deferred = MetricAccumulator(ks=(1, 10))
    streamed = MetricAccumulator(ks=(1, 10), item_vectors=vecs)
    for s in range(0, 50, 7):  # uneven batches
        deferred.add(ranks[s : s + 7], topk[s : s + 7])
        streamed.add(ranks[s : s + 7], topk[s : s + 7])
    a = deferred.result(item_vectors=vecs, item_popularity=pop, num_items=n)
    b = streamed.result(item_popularity=pop, num_items=n)

    expect = rank_metrics(ranks, (1, 10))
    expect.update(
        Coverage=coverage(topk, n),
        Gini=gini_index(topk, n),
        Novelty=novelty(topk, pop),
        ILD=intra_list_diversity(topk, vecs),
        num_users=50.0,
    )
    assert a.keys() == expect.keys() == b.keys()
    for key, val in expect.items():
        assert a[key] == pytest.approx(val), key
        assert b[key] == pytest.approx(val), key


def test_accumulator_ranks_only_and_errors():
    acc = MetricAccumulator(ks=(1,))
    acc.add(np.array([0, 3]))
    # HR@1 = 1/2, MRR = (1 + 1/4)/2 = 0.625
    r = acc.result()
    assert r["HR@1"] == pytest.approx(0.5) and r["MRR"] == pytest.approx(0.625)
    assert "Coverage" not in r
    acc.add(np.array([1]), np.array([[1, 2]]))
    with pytest.raises(ValueError):
        acc.result()  # num_items unknown
    with pytest.raises(ValueError):
        acc.result(num_items=1)  # list holds id 2 > 1
    assert acc.result(num_items=4)["Coverage"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------


@st.composite
def scored_batches(draw, max_b=6, max_n=12):
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_n))
    # Small integer-valued scores so ties are frequent.
    scores = np.array(
        draw(st.lists(st.integers(-3, 3), min_size=b * (n + 1), max_size=b * (n + 1))), np.float32
    ).reshape(b, n + 1)
    targets = np.array(draw(st.lists(st.integers(1, n), min_size=b, max_size=b)))
    excl = np.array(draw(st.lists(st.booleans(), min_size=b * (n + 1), max_size=b * (n + 1)))).reshape(b, n + 1)
    return scores, targets, excl


@settings(max_examples=60, deadline=None)
@given(scored_batches())
def test_prop_ranks_in_range_and_exclusion_never_hurts(data):
    scores, targets, excl = data
    n = scores.shape[1] - 1
    full = ranks_from_scores(scores, targets)
    excluded = ranks_from_scores(scores, targets, excl)
    assert ((full >= 0) & (full <= n - 1)).all()
    assert (excluded <= full).all()
    assert (excluded >= 0).all()


_jit_ranks = jax.jit(ranks_from_scores_jax)


@settings(max_examples=25, deadline=None)
@given(scored_batches(max_b=3, max_n=5))
def test_prop_jax_equals_numpy(data):
    scores, targets, excl = data
    np.testing.assert_array_equal(
        np.asarray(_jit_ranks(scores, targets, excl)), ranks_from_scores(scores, targets, excl)
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=50))
def test_prop_rank_metrics_monotone(ranks):
    ks = (1, 2, 5, 10, 20, 50)
    m = rank_metrics(np.array(ranks), ks)
    for k1, k2 in zip(ks, ks[1:]):
        assert m[f"HR@{k1}"] <= m[f"HR@{k2}"]
        assert m[f"NDCG@{k1}"] <= m[f"NDCG@{k2}"] + 1e-12
    for k in ks:
        assert 0.0 <= m[f"NDCG@{k}"] <= m[f"HR@{k}"] + 1e-12 <= 1.0 + 1e-12
    assert 0.0 < m["MRR"] <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.randoms(use_true_random=False))
def test_prop_perfect_scorer(b, n, rnd):
    targets = np.array([rnd.randint(1, n) for _ in range(b)])
    scores = np.zeros((b, n + 1))
    scores[np.arange(b), targets] = 1.0
    m = rank_metrics(ranks_from_scores(scores, targets), ks=(1, 5))
    assert m["HR@1"] == 1.0 and m["MRR"] == 1.0 and m["NDCG@1"] == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 15), st.data())
def test_prop_gini_coverage_in_unit_interval(n, data):
    b = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 5))
    topk = np.array(data.draw(st.lists(st.integers(1, n), min_size=b * k, max_size=b * k))).reshape(b, k)
    g, c = gini_index(topk, n), coverage(topk, n)
    assert 0.0 <= g <= 1.0 and 0.0 < c <= 1.0
    assert g <= (n - 1) / n + 1e-12

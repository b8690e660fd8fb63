"""Tests for genrec_jax.eval.baselines on tiny hand-made sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.data.types import EventSequences
from genrec_jax.eval.baselines import (
    PopularityBaseline,
    TransitionBaseline,
    evaluate_baseline,
    history_mask,
    top_k_items,
)
from genrec_jax.eval.metrics import ranks_from_scores

N = 5
# Transitions within users: 1->2 (x2), 1->3, 2->3, 2->4, 3->5, 4->4.
# Cross-user pairs (3->1, 4->1, 5->4, 4->4 across users) must NOT be counted.
# Popularity: item1=3, item2=2, item3=2, item4=4, item5=1.
TRAIN = [
    np.array([1, 2, 3]),
    np.array([1, 2, 4]),
    np.array([], dtype=np.int32),  # empty user in the middle
    np.array([1, 3, 5]),
    np.array([4, 4]),
    np.array([4]),
]


@pytest.fixture(scope="module")
def train() -> EventSequences:
    return EventSequences.from_lists(TRAIN)


def test_popularity_scores(train):
    model = PopularityBaseline(N).fit(train)
    np.testing.assert_array_equal(model.popularity, [0, 3, 2, 2, 4, 1])
    s = model.scores([np.array([1]), np.array([], np.int32)])
    assert s.dtype == np.float32 and s.shape == (2, N + 1)
    assert np.isneginf(s[:, 0]).all()
    np.testing.assert_array_equal(s[0], s[1])
    np.testing.assert_array_equal(s[0, 1:], [3, 2, 2, 4, 1])
    # Order: 4 (4), 1 (3), 2|3 (2, tie -> lower id first), 5 (1); 0 never appears.
    np.testing.assert_array_equal(top_k_items(s, N)[0], [4, 1, 2, 3, 5])


def test_popularity_requires_fit():
    with pytest.raises(RuntimeError):
        PopularityBaseline(N).scores([np.array([1])])


def test_transition_counts_csr(train):
    model = TransitionBaseline(N).fit(train)
    assert len(model.indptr) == N + 2
    succ = {a: dict(zip(*map(list, model.successors(a)))) for a in range(N + 1)}
    assert succ == {0: {}, 1: {2: 2, 3: 1}, 2: {3: 1, 4: 1}, 3: {5: 1}, 4: {4: 1}, 5: {}}


def test_transition_scores_and_order(train):
    model = TransitionBaseline(N).fit(train)
    hist = [np.array([3, 1]), np.array([2]), np.array([5]), np.array([], np.int32)]
    s = model.scores(hist)
    assert s.shape == (4, N + 1) and np.isneginf(s[:, 0]).all()
    # After 1: item 2 (count 2) first, item 3 (count 1) second, then by popularity: 4, 1, 5.
    # After 2: 3 and 4 both count 1 -> popularity breaks the tie: 4 (pop 4) before 3 (pop 2).
    # After 5 (no successors) and after nothing: pure popularity 4, 1, 2, 3, 5.
    top = top_k_items(s, N)
    np.testing.assert_array_equal(top[0], [2, 3, 4, 1, 5])
    np.testing.assert_array_equal(top[1][:2], [4, 3])
    np.testing.assert_array_equal(top[2], [4, 1, 2, 3, 5])
    np.testing.assert_array_equal(top[3], [4, 1, 2, 3, 5])
    # Exact scores: count + 1e-6 * pop / max_pop.
    assert s[0, 2] == pytest.approx(2 + 1e-6 * 2 / 4, abs=1e-12)
    assert s[0, 3] == pytest.approx(1 + 1e-6 * 2 / 4, abs=1e-12)
    # Pessimistic ranks: target 3 after history [.., 1] is second.
    assert ranks_from_scores(s[:1], np.array([3]))[0] == 1
    assert ranks_from_scores(s[1:2], np.array([3]))[0] == 1


def test_transition_float32_option(train):
    s = TransitionBaseline(N, dtype=np.float32).fit(train).scores([np.array([1])])
    assert s.dtype == np.float32
    np.testing.assert_array_equal(top_k_items(s, 2)[0], [2, 3])


def test_transition_rejects_bad_ids(train):
    model = TransitionBaseline(N).fit(train)
    with pytest.raises(ValueError):
        model.scores([np.array([N + 1])])
    with pytest.raises(ValueError):
        TransitionBaseline(N).fit(EventSequences.from_lists([np.array([1, 0, 2])]))
    with pytest.raises(ValueError):
        TransitionBaseline(N, popularity_tiebreak=1.0)


def test_history_mask_and_exclusion(train):
    mask = history_mask([np.array([4, 1, 4]), np.array([], np.int32)], N)
    np.testing.assert_array_equal(mask[0], [False, True, False, False, True, False])
    assert not mask[1].any()
    s = TransitionBaseline(N).fit(train).scores([np.array([4, 1])])
    # Excluding history {1, 4}: list is 2, 3, 5 (1 and 4 dropped).
    np.testing.assert_array_equal(top_k_items(s, 3, mask[:1])[0], [2, 3, 5])
    # Target 5: without exclusion 2, 3, 4, 1 beat it (rank 4); excluding {1, 4}: rank 2.
    assert ranks_from_scores(s, np.array([5]))[0] == 4
    assert ranks_from_scores(s, np.array([5]), mask[:1])[0] == 2


def test_column_zero_never_recommended(train):
    # Even with every real item at -inf, column 0 never shows up in a top-N list.
    s = np.full((1, N + 1), -np.inf)
    assert 0 not in top_k_items(s, N)
    for model in (PopularityBaseline(N), TransitionBaseline(N)):
        s = model.fit(train).scores([np.array([1]), np.array([5])])
        assert 0 not in top_k_items(s, N)
    with pytest.raises(ValueError):
        top_k_items(s, N + 1)


def _evaluate(train, exclude):
    model = TransitionBaseline(N).fit(train)
    hist = [np.array([1]), np.array([2]), np.array([4, 5])]
    return evaluate_baseline(
        model, hist, np.array([2, 3, 1]), N, ks=(1, 2), exclude_history=exclude, batch_size=2,
        item_popularity=model.popularity,
    )


def test_evaluate_baseline_no_exclusion(train):
    m = _evaluate(train, exclude=False)
    # Ranks: [1]->2 is first (0); [2]->3 loses the popularity tie-break to 4 (1);
    # [4,5]->1: last item 5 has no successors, popularity 4 > 1 (1). ranks = [0, 1, 1]
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(1.0)
    # MRR = (1 + 1/2 + 1/2) / 3 = 2/3 ; NDCG@2 = (1 + 2/log2 3) / 3
    assert m["MRR"] == pytest.approx(2 / 3)
    assert m["NDCG@2"] == pytest.approx((1 + 2 / math.log2(3)) / 3)
    # Top-2 lists: [2,3], [4,3], [4,1] -> items {1,2,3,4} of 5 -> coverage 0.8
    assert m["Coverage"] == pytest.approx(0.8)
    # Counts 1:1, 2:1, 3:2, 4:2, 5:0 -> sorted [0,1,1,2,2], sum 6:
    # sum (2i-6) x = -4*0 - 2*1 + 0*1 + 2*2 + 4*2 = 10 -> G = 10 / (5*6) = 1/3
    assert m["Gini"] == pytest.approx(1 / 3)
    assert m["num_users"] == 3.0
    assert "Novelty" in m and m["Novelty"] > 0


def test_evaluate_baseline_exclude_history(train):
    m = _evaluate(train, exclude=True)
    # [1]->2: 0 ; [2]->3: item 4 still beats (1) ; [4,5]->1: 4 excluded, 1 is first (0).
    assert m["HR@1"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((1 + 0.5 + 1) / 3)


# ------------------------------------------------------------------------------------------
# Property: CSR transition counts equal a naive dense count
# ------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.data())
def test_prop_transition_counts_match_naive(n, data):
    seqs = data.draw(st.lists(st.lists(st.integers(1, n), max_size=6), max_size=6))
    train = EventSequences.from_lists([np.array(x, dtype=np.int32) for x in seqs])
    model = TransitionBaseline(n).fit(train)
    dense = np.zeros((n + 1, n + 1), np.int64)
    for x in seqs:
        for a, b in zip(x, x[1:]):
            dense[a, b] += 1
    got = np.zeros_like(dense)
    for a in range(n + 1):
        idx, cnt = model.successors(a)
        got[a, idx] = cnt
    np.testing.assert_array_equal(got, dense)
    # Scores: counts dominate the tie-break, column 0 is -inf.
    hist = [np.array(x, dtype=np.int32) for x in seqs] or [np.zeros(0, np.int32)]
    s = model.scores(hist)
    assert np.isneginf(s[:, 0]).all()
    last = [x[-1] if len(x) else 0 for x in (seqs or [[]])]
    np.testing.assert_array_equal(np.floor(s[:, 1:]).astype(np.int64), dense[last, 1:])

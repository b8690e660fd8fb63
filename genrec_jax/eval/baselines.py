"""Non-neural baselines (popularity, first-order item transitions) and a shared evaluation loop.

Every baseline has ``fit(train: EventSequences)`` and ``scores(histories) -> [B, N + 1]`` with
column 0 (padding) set to ``-inf``, so any model with the same ``scores`` method can be passed
to :func:`evaluate_baseline`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from genrec_jax.data.types import EventSequences
from genrec_jax.eval.metrics import DEFAULT_KS, MetricAccumulator, ranks_from_scores

__all__ = [
    "PopularityBaseline",
    "Scorer",
    "TransitionBaseline",
    "evaluate_baseline",
    "history_mask",
    "top_k_items",
]


class Scorer(Protocol):
    num_items: int

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...


def _check_items(items: np.ndarray, num_items: int, what: str) -> None:
    if items.size and (items.min() < 1 or items.max() > num_items):
        raise ValueError(f"{what} item ids must lie in 1..{num_items}")


def _item_counts(train: EventSequences, num_items: int) -> np.ndarray:
    items = np.asarray(train.items)
    _check_items(items, num_items, "training")
    return np.bincount(items, minlength=num_items + 1).astype(np.int64)


class PopularityBaseline:
    """Scores every item by its training interaction count (same vector for every user)."""

    def __init__(self, num_items: int):
        self.num_items = int(num_items)
        self.popularity: np.ndarray | None = None  # int64 [N + 1], index 0 = 0

    def fit(self, train: EventSequences) -> "PopularityBaseline":
        self.popularity = _item_counts(train, self.num_items)
        return self

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [B, N + 1]: ``score[u, i] = count(i)``; column 0 = ``-inf``."""
        if self.popularity is None:
            raise RuntimeError("call fit() first")
        row = self.popularity.astype(np.float32)
        row[0] = -np.inf
        return np.broadcast_to(row, (len(histories), self.num_items + 1)).copy()


class TransitionBaseline:
    """First-order Markov baseline: what followed the user's last item in training.

    ``T[a, b]`` = number of times item ``b`` directly follows item ``a`` within one user's
    training sequence (consecutive events; self-transitions ``a -> a`` included). For a history
    ending in item ``a``::

        score[i] = T[a, i] + popularity_tiebreak * count(i) / max_j count(j)

    so items with equal transition counts are ordered by popularity, and users whose last item
    has no successors (or who have no history) get the popularity ranking. ``T`` is stored in
    CSR form (``indptr`` [N + 2], ``indices``, ``data``); ``scores`` builds dense rows for the
    batch only. Scores are float64 by default: in float32 a tie-break of ``1e-6`` added to a
    count >= 1 is mostly rounded away.
    """

    def __init__(self, num_items: int, popularity_tiebreak: float = 1e-6, dtype=np.float64):
        if not 0.0 <= popularity_tiebreak < 1.0:
            raise ValueError("popularity_tiebreak must be in [0, 1) so counts always dominate")
        self.num_items = int(num_items)
        self.popularity_tiebreak = float(popularity_tiebreak)
        self.dtype = np.dtype(dtype)
        self.popularity: np.ndarray | None = None
        self.indptr: np.ndarray | None = None  # int64 [N + 2]: row a owns indptr[a]:indptr[a+1]
        self.indices: np.ndarray | None = None  # int32 [nnz], successor item ids, sorted per row
        self.data: np.ndarray | None = None  # int64 [nnz], transition counts

    def fit(self, train: EventSequences) -> "TransitionBaseline":
        n = self.num_items
        self.popularity = _item_counts(train, n)
        items = np.asarray(train.items, dtype=np.int64)
        # Consecutive pair (t, t + 1) is within one user unless t + 1 starts a new sequence.
        same_user = np.ones(max(len(items) - 1, 0), dtype=bool)
        starts = np.asarray(train.offsets[1:-1], dtype=np.int64)  # start of users 1..U-1
        starts = starts[(starts > 0) & (starts < len(items))]
        same_user[starts - 1] = False
        src, dst = items[:-1][same_user], items[1:][same_user]
        keys, counts = np.unique(src * (n + 1) + dst, return_counts=True)  # sorted by (src, dst)
        rows = keys // (n + 1)
        self.indices = (keys % (n + 1)).astype(np.int32)
        self.data = counts.astype(np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n + 1))]).astype(np.int64)
        return self

    def successors(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(successor ids, counts) of ``item`` from the CSR structure."""
        if self.indptr is None:
            raise RuntimeError("call fit() first")
        s, e = self.indptr[item], self.indptr[item + 1]
        return self.indices[s:e], self.data[s:e]

    def scores(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """[B, N + 1] in ``self.dtype``: transition counts from the last item + popularity tie-break."""
        if self.indptr is None or self.popularity is None:
            raise RuntimeError("call fit() first")
        n, b = self.num_items, len(histories)
        last = np.array([int(h[-1]) if len(h) else 0 for h in histories], dtype=np.int64)
        _check_items(last[last > 0], n, "history")
        top = max(int(self.popularity.max()), 1)
        base = (self.popularity_tiebreak * (self.popularity / top)).astype(self.dtype)
        out = np.broadcast_to(base, (b, n + 1)).copy()
        # Gather the CSR rows of the last items (row 0 = "no history" is always empty).
        begin, end = self.indptr[last], self.indptr[last + 1]
        lens = end - begin
        row_of = np.repeat(np.arange(b), lens)
        pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(begin, lens)
        out[row_of, self.indices[pos]] += self.data[pos].astype(self.dtype)
        out[:, 0] = -np.inf
        return out


def history_mask(histories: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """bool [B, N + 1]: ``mask[u, i]`` is True when item ``i`` occurs in history ``u``."""
    mask = np.zeros((len(histories), num_items + 1), dtype=bool)
    lens = np.array([len(h) for h in histories], dtype=np.int64)
    if lens.sum():
        cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        mask[np.repeat(np.arange(len(histories)), lens), cols] = True
    mask[:, 0] = False
    return mask


def top_k_items(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """int32 [B, k]: the k best real items per row (descending score, ties by lower id).

    Column 0 and excluded items are never returned while enough other items remain
    (``k`` must not exceed the number of real items).
    """
    scores = np.asarray(scores)
    n = scores.shape[1] - 1
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if np.isnan(scores[:, 1:]).any():
        raise ValueError("scores contain NaN")
    b = len(scores)
    if b == 0:
        return np.zeros((0, k), np.int32)
    # Work on -score (a fresh copy): ascending order, and partitioning near the front is fast
    # even when the scores have huge tie groups (e.g. popularity).
    s = np.negative(scores[:, 1:], dtype=np.result_type(scores.dtype, np.float32))
    if exclude is not None:
        s[np.asarray(exclude, dtype=bool)[:, 1:]] = np.inf
    kth = np.partition(s, k - 1, axis=1)[:, k - 1 : k]  # minus the k-th largest score per row
    take = s <= kth
    excess = take.sum(axis=1) - k  # items tied with the k-th beyond the k we need
    for r in np.flatnonzero(excess):  # drop the highest-id tied items in those rows
        drop = np.flatnonzero(s[r] == kth[r, 0])[-excess[r] :]
        take[r, drop] = False
    ids = np.nonzero(take)[1].reshape(b, k)  # exactly k per row, ascending id
    vals = np.take_along_axis(s, ids, axis=1)
    order = np.lexsort((ids, vals), axis=1)  # descending score, then ascending id
    return (np.take_along_axis(ids, order, axis=1) + 1).astype(np.int32)


def evaluate_baseline(
    model: Scorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    num_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_history: bool = False,
    batch_size: int = 1024,
    item_popularity: np.ndarray | None = None,
    item_vectors: np.ndarray | None = None,
) -> dict[str, float]:
    """Leave-one-out, full-ranking evaluation of any object with ``scores(histories)``.

    For each batch: score, optionally remove the user's history items from the ranking (the
    target itself always stays), compute pessimistic ranks, and the top-``max(ks)`` lists
    (capped at N) for Coverage / Gini (+ Novelty given ``item_popularity`` [N + 1], ILD given
    ``item_vectors`` [N + 1, D]). Returns :meth:`MetricAccumulator.result`.
    """
    targets = np.asarray(targets)
    if len(targets) != len(histories):
        raise ValueError("need one target per history")
    k_list = min(max(ks), num_items)
    acc = MetricAccumulator(ks, item_vectors=item_vectors)
    for s in range(0, len(histories), batch_size):
        hist = histories[s : s + batch_size]
        scores = model.scores(hist)
        if scores.shape != (len(hist), num_items + 1):
            raise ValueError(f"model.scores returned shape {scores.shape}, want {(len(hist), num_items + 1)}")
        excl = history_mask(hist, num_items) if exclude_history else None
        acc.add(ranks_from_scores(scores, targets[s : s + batch_size], excl), top_k_items(scores, k_list, excl))
    return acc.result(item_popularity=item_popularity, num_items=num_items)

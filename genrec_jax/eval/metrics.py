"""Ranking and beyond-accuracy metrics for leave-one-out, full-catalogue evaluation.

Protocol: every evaluated user has exactly one held-out target item, and the model scores the
whole catalogue. Item ids are ``1..N``; column 0 of a score matrix is the padding item and is
never ranked.

Rank definition (0-based, pessimistic about ties)::

    rank(u) = #{ j in 1..N : j != t_u, not exclude[u, j], s[u, j] >= s[u, t_u] }

i.e. the number of *other eligible* items scoring at least as high as the target. Ties count
against the model, so a constant scorer gets the worst possible rank (N - 1 - #excluded) and a
model cannot gain from emitting identical scores. The target is never excluded, even when it
appears in ``exclude`` (e.g. a re-consumed history item).

From ranks (one relevant item per user)::

    HR@k     = mean_u [rank_u < k]               (Recall@k is identical, both keys reported)
    NDCG@k   = mean_u [rank_u < k] / log2(rank_u + 2)
    MRR      = mean_u 1 / (rank_u + 1)           (over the full ranking, not truncated)

Beyond accuracy, over top-K lists ``topk`` int [B, K] of item ids ``1..N``: :func:`coverage`,
:func:`intra_list_diversity`, :func:`novelty`, :func:`gini_index`. :class:`MetricAccumulator`
combines everything over many batches, keeping only ranks and per-item recommendation counts
(plus the top-K id lists when diversity has to be computed at the end).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)

__all__ = [
    "DEFAULT_KS",
    "MetricAccumulator",
    "coverage",
    "gini_index",
    "intra_list_diversity",
    "novelty",
    "rank_metrics",
    "ranks_from_scores",
    "ranks_from_scores_jax",
    "recommendation_counts",
]


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


def _check_scores_targets(scores: np.ndarray, targets: np.ndarray) -> None:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, N + 1] with N >= 1, got shape {scores.shape}")
    if targets.ndim != 1 or len(targets) != scores.shape[0]:
        raise ValueError(f"targets must be [B] with B = {scores.shape[0]}, got shape {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer item ids, got dtype {targets.dtype}")
    n = scores.shape[1] - 1
    if len(targets) and (targets.min() < 1 or targets.max() > n):
        raise ValueError(f"targets must lie in 1..{n} (0 is padding)")


def ranks_from_scores(
    scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """0-based pessimistic rank of each target among the eligible items.

    ``rank[u] = #{j in 1..N, j != t_u, not exclude[u, j] : scores[u, j] >= scores[u, t_u]}``.

    Args:
        scores: float [B, N + 1]; column 0 (padding) is ignored.
        targets: int [B], ids in ``1..N``.
        exclude: optional bool [B, N + 1], items removed from the ranking (e.g. the user's
            history). ``exclude[u, targets[u]]`` is ignored: the target is always ranked.

    Returns:
        int64 [B], each in ``[0, N - 1]``.

    Raises:
        ValueError: on NaN scores among the real items, bad shapes or out-of-range targets.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    _check_scores_targets(scores, targets)
    if np.isnan(scores[:, 1:]).any():
        raise ValueError("scores contain NaN; refusing to rank")
    b = np.arange(len(targets))
    target_scores = scores[b, targets]
    counted = scores >= target_scores[:, None]  # [B, N + 1] bool
    counted[:, 0] = False
    counted[b, targets] = False
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must have shape {scores.shape}, got {exclude.shape}")
        counted &= ~exclude
    return counted.sum(axis=1, dtype=np.int64)


def ranks_from_scores_jax(scores, targets, exclude_mask=None):
    """jit-compatible :func:`ranks_from_scores` (same definition, ``jnp`` ops).

    NaN handling differs because a traced function cannot raise: a NaN score is treated as a
    tie *against* the model (a NaN target score is beaten by every eligible item; a NaN
    competitor beats the target), so NaNs can only make ranks worse, never better. Targets are
    not range-checked. Note that with ``jax_enable_x64`` off, float64 inputs are cast to
    float32, which can create ties the numpy version would not see.

    Args:
        scores: float [B, N + 1].
        targets: int [B] in ``1..N``.
        exclude_mask: optional bool [B, N + 1] (``None`` = exclude nothing).

    Returns:
        int32 [B].
    """
    scores = jnp.asarray(scores)
    targets = jnp.asarray(targets).astype(jnp.int32)
    target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)  # [B, 1]
    beats = (scores >= target_scores) | jnp.isnan(scores) | jnp.isnan(target_scores)
    cols = jnp.arange(scores.shape[1], dtype=jnp.int32)[None, :]
    eligible = (cols != 0) & (cols != targets[:, None])
    if exclude_mask is not None:
        eligible = eligible & ~jnp.asarray(exclude_mask, dtype=bool)
    return jnp.sum(beats & eligible, axis=1, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Accuracy metrics from ranks
# --------------------------------------------------------------------------------------------


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    return ks


def _check_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {ranks.shape}")
    if len(ranks) and not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    if len(ranks) and ranks.min() < 0:
        raise ValueError("ranks must be >= 0")
    return ranks.astype(np.int64)


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@k, Recall@k, NDCG@k for each k, and MRR from 0-based ranks of one target per user.

    ``HR@k = mean[rank < k]`` (= ``Recall@k`` with one relevant item),
    ``NDCG@k = mean([rank < k] / log2(rank + 2))`` (the ideal DCG is 1),
    ``MRR = mean(1 / (rank + 1))`` over the full ranking.

    Raises:
        ValueError: if ``ranks`` is empty or negative.
    """
    ks = _check_ks(ks)
    ranks = _check_ranks(ranks)
    if len(ranks) == 0:
        raise ValueError("rank_metrics needs at least one rank")
    gain = 1.0 / np.log2(ranks + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"Recall@{k}"] = out[f"HR@{k}"]
        out[f"NDCG@{k}"] = float(np.where(hit, gain, 0.0).mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


# --------------------------------------------------------------------------------------------
# Beyond-accuracy metrics over top-K lists
# --------------------------------------------------------------------------------------------


def _check_topk(topk: np.ndarray, num_items: int | None = None) -> np.ndarray:
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be [B, K], got shape {topk.shape}")
    if topk.size and not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk must hold integer item ids, got dtype {topk.dtype}")
    if topk.size and topk.min() < 1:
        raise ValueError("topk item ids must be >= 1 (0 is padding)")
    if num_items is not None and topk.size and topk.max() > num_items:
        raise ValueError(f"topk item ids must be <= num_items = {num_items}")
    return topk


def recommendation_counts(topk: np.ndarray, num_items: int) -> np.ndarray:
    """int64 [N + 1]: how many lists recommend each item (index 0 always 0)."""
    topk = _check_topk(topk, num_items)
    return np.bincount(topk.reshape(-1), minlength=num_items + 1).astype(np.int64)


def _coverage_from_counts(counts: np.ndarray, num_items: int) -> float:
    return float(np.count_nonzero(counts[1 : num_items + 1]) / num_items)


def _gini_from_counts(counts: np.ndarray, num_items: int) -> float:
    """Gini of x = counts[1..N] sorted ascending: ``sum_i (2i - N - 1) x_(i) / (N sum x)``."""
    x = np.sort(counts[1 : num_items + 1].astype(np.float64))
    total = x.sum()
    if total <= 0:
        raise ValueError("gini_index needs at least one recommended item")
    i = np.arange(1, num_items + 1, dtype=np.float64)
    return float(np.sum((2.0 * i - num_items - 1.0) * x) / (num_items * total))


def _self_information(item_popularity: np.ndarray, num_items: int) -> np.ndarray:
    """float64 [N + 1]: ``-log2 p(i)``, ``p(i) = (count(i) + 1) / (total + N)``; index 0 unused."""
    pop = np.asarray(item_popularity)
    if pop.ndim != 1 or len(pop) != num_items + 1:
        raise ValueError(f"item_popularity must be [N + 1] = [{num_items + 1}], got shape {pop.shape}")
    if (pop[1:] < 0).any():
        raise ValueError("item_popularity counts must be >= 0")
    counts = pop.astype(np.float64)
    counts[0] = 0.0
    p = (counts + 1.0) / (counts[1:].sum() + num_items)
    return -np.log2(p)


def coverage(topk: np.ndarray, num_items: int) -> float:
    """Catalogue coverage: ``|union of all lists| / N``, in ``[0, 1]``."""
    return _coverage_from_counts(recommendation_counts(topk, num_items), num_items)


def gini_index(topk: np.ndarray, num_items: int) -> float:
    """Gini index of how often each of the N catalogue items is recommended.

    With ``x_(1) <= ... <= x_(N)`` the sorted recommendation counts (never-recommended items
    count 0)::

        G = sum_i (2 i - N - 1) x_(i) / (N * sum_i x_(i))

    0 = every item recommended equally often; all recommendations on one item gives the
    standard maximum ``(N - 1) / N`` (-> 1 for a large catalogue). Same formula as RecBole.
    """
    return _gini_from_counts(recommendation_counts(topk, num_items), num_items)


def novelty(topk: np.ndarray, item_popularity: np.ndarray) -> float:
    """Mean self-information of the recommended items, in bits.

    ``novelty = mean_{u, r} -log2 p(topk[u, r])`` with ``p(i) = (count(i) + 1) / (total + N)``
    (add-one smoothing), ``count = item_popularity[1:]`` (index 0 ignored), ``total = sum count``.
    """
    num_items = len(np.asarray(item_popularity)) - 1
    topk = _check_topk(topk, num_items)
    if topk.size == 0:
        raise ValueError("novelty needs at least one recommended item")
    return float(_self_information(item_popularity, num_items)[topk].mean())


def _ild_per_list(topk: np.ndarray, item_vectors: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """float64 [B]: mean over ordered pairs a != b of ``1 - cos(v_a, v_b)`` for each list."""
    b, k = topk.shape
    out = np.empty(b, np.float64)
    if k < 2:
        out.fill(np.nan)
        return out
    vecs = np.asarray(item_vectors, dtype=np.float64)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)  # zero rows stay 0
    for s in range(0, b, chunk):
        u = unit[topk[s : s + chunk]]  # [b', K, D]
        sims = np.einsum("bkd,bld->bkl", u, u)
        off_diag = sims.sum(axis=(1, 2)) - np.trace(sims, axis1=1, axis2=2)
        out[s : s + chunk] = 1.0 - off_diag / (k * (k - 1))
    return out


def _check_vectors(item_vectors: np.ndarray, topk: np.ndarray) -> np.ndarray:
    item_vectors = np.asarray(item_vectors)
    if item_vectors.ndim != 2:
        raise ValueError(f"item_vectors must be [N + 1, D], got shape {item_vectors.shape}")
    if topk.size and topk.max() >= len(item_vectors):
        raise ValueError("topk holds an item id with no row in item_vectors")
    return item_vectors


def intra_list_diversity(topk: np.ndarray, item_vectors: np.ndarray) -> float:
    """Intra-list diversity (ILD).

    ``ILD = mean_u  1/(K(K-1)) sum_{a != b in list u} (1 - cos(v_a, v_b))``, where
    ``cos = 0`` whenever either vector has zero norm. ``item_vectors`` is float [N + 1, D]
    (row 0 = padding). Lists with K < 2 have no pairs: the result is NaN.
    """
    topk = _check_topk(topk)
    item_vectors = _check_vectors(item_vectors, topk)
    if topk.shape[0] == 0:
        raise ValueError("intra_list_diversity needs at least one list")
    return float(_ild_per_list(topk, item_vectors).mean())


# --------------------------------------------------------------------------------------------
# Streaming accumulator
# --------------------------------------------------------------------------------------------


class MetricAccumulator:
    """Accumulates ranks and top-K lists over batches; :meth:`result` reports every metric.

    Memory: one int32 rank per user, one int64 count per item, and either the int32 top-K ids
    (when ILD is computed at the end from ``result(item_vectors=...)``) or one float per batch
    (when ``item_vectors`` is given here, ILD is computed as the batches arrive).

    Example::

        acc = MetricAccumulator(ks=(10, 50))
        for batch in batches:
            acc.add(ranks_from_scores(s, t, excl), topk)
        acc.result(num_items=N, item_popularity=pop)
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, item_vectors: np.ndarray | None = None):
        self.ks = _check_ks(ks)
        self._item_vectors = None if item_vectors is None else np.asarray(item_vectors)
        self._ranks: list[np.ndarray] = []
        self._rec_counts = np.zeros(1, np.int64)
        self._num_lists = 0
        self._num_recs = 0
        self._topk: list[np.ndarray] = []  # only when ILD is deferred to result()
        self._ild_sum = 0.0

    def add(self, ranks: np.ndarray, topk: np.ndarray | None = None) -> None:
        """Add a batch: ``ranks`` int [B] (0-based) and optionally ``topk`` int [B', K]."""
        ranks = _check_ranks(ranks)
        self._ranks.append(ranks.astype(np.int32))
        if topk is None:
            return
        topk = _check_topk(topk)
        if topk.size == 0:
            return
        counts = np.bincount(topk.reshape(-1))
        if len(counts) > len(self._rec_counts):
            self._rec_counts = np.pad(self._rec_counts, (0, len(counts) - len(self._rec_counts)))
        self._rec_counts[: len(counts)] += counts
        self._num_lists += topk.shape[0]
        self._num_recs += topk.size
        if self._item_vectors is not None:
            vecs = _check_vectors(self._item_vectors, topk)
            self._ild_sum += float(_ild_per_list(topk, vecs).sum())
        else:
            self._topk.append(topk.astype(np.int32))

    @property
    def num_users(self) -> int:
        return int(sum(len(r) for r in self._ranks))

    def result(
        self,
        item_vectors: np.ndarray | None = None,
        item_popularity: np.ndarray | None = None,
        num_items: int | None = None,
    ) -> dict[str, float]:
        """All metrics so far.

        Always: ``HR@k``, ``Recall@k``, ``NDCG@k``, ``MRR``, ``num_users``. When top-K lists were
        added (``num_items`` required): ``Coverage``, ``Gini``; plus ``Novelty`` given
        ``item_popularity`` [N + 1], and ``ILD`` given ``item_vectors`` (here or at construction).
        """
        ranks = np.concatenate(self._ranks) if self._ranks else np.zeros(0, np.int64)
        out = rank_metrics(ranks, self.ks)
        out["num_users"] = float(len(ranks))
        if self._num_lists == 0:
            return out
        if num_items is None:
            if item_popularity is None:
                raise ValueError("result() needs num_items to report coverage / Gini")
            num_items = len(item_popularity) - 1
        if len(self._rec_counts) > num_items + 1:
            raise ValueError(f"a top-K list holds an item id > num_items = {num_items}")
        counts = np.pad(self._rec_counts, (0, num_items + 1 - len(self._rec_counts)))
        out["Coverage"] = _coverage_from_counts(counts, num_items)
        out["Gini"] = _gini_from_counts(counts, num_items)
        if item_popularity is not None:
            info = _self_information(item_popularity, num_items)
            out["Novelty"] = float(np.dot(counts[1:], info[1:]) / self._num_recs)
        if self._item_vectors is not None:
            if item_vectors is not None:
                raise ValueError("item_vectors were given at construction; do not pass them again")
            out["ILD"] = self._ild_sum / self._num_lists
        elif item_vectors is not None:
            total = 0.0
            for topk in self._topk:
                total += float(_ild_per_list(topk, _check_vectors(item_vectors, topk)).sum())
            out["ILD"] = total / self._num_lists
        return out

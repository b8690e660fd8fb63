"""Generative evaluation: Recall@K / NDCG@K of beam-searched items, leave-one-out.

Same protocol as the retrieval head (genrec_jax.eval.evaluate): one held-out target per
user, the history truncated to the last ``max_len`` events. The model writes its top
``k = max(ks)`` items by trie-constrained beam search (width ``max(beam_width, k)``); the
target's rank is its position in that list, or ``num_items`` when the list misses it
(so HR@k / NDCG@k for k <= max(ks) are exact, and MRR is MRR@max(ks)). With
``exclude_history`` the search returns all W beams and history items are dropped from
them before the top k are kept.
"""

from __future__ import annotations

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from genrec_jax.data.batching import eval_batches
from genrec_jax.data.sequences import EvalSet
from genrec_jax.eval.metrics import MetricAccumulator
from genrec_jax.semantic_ids.beam_search import make_recommend_fn
from genrec_jax.semantic_ids.trie import Trie

HOST_ONLY_KEYS = ("history_items",)


def ranks_in_lists(lists: np.ndarray, targets: np.ndarray, miss_rank: int) -> np.ndarray:
    """0-based position of each target in its list (``miss_rank`` where absent)."""
    hit = lists == targets[:, None]
    return np.where(hit.any(1), hit.argmax(1), miss_rank).astype(np.int64)


def drop_history(lists: np.ndarray, histories: list[np.ndarray], k: int) -> np.ndarray:
    """The first ``k`` items of each list that are not in the user's history (0-padded)."""
    out = np.zeros((len(lists), k), lists.dtype)
    for r, (row, hist) in enumerate(zip(lists, histories)):
        keep = row[(row > 0) & ~np.isin(row, hist)][:k]
        out[r, : len(keep)] = keep
    return out


def evaluate_generative(
    model,
    es: EvalSet,
    *,
    trie: Trie,
    max_len: int,
    ks: list[int],
    batch_size: int,
    beam_width: int,
    exclude_history: bool = False,
    max_users: int = 0,
    item_popularity: np.ndarray | None = None,
    item_vectors: np.ndarray | None = None,
    renormalize: bool = False,
    uniform_last_level: bool = False,
    options=None,
    device_batch=None,
    progress: bool = False,
    desc: str = "generative",
) -> dict[str, float]:
    """HR@K / Recall@K / NDCG@K (+ MRR@max K, coverage, Gini...) of beam search for a
    Recommender with a decoder. ``device_batch``: how to place a host batch (default:
    ``jnp.asarray`` by jit)."""
    num_items = trie.num_items if model.num_items is None else model.num_items
    k = min(max(ks), trie.num_items)
    width = max(beam_width, k)
    fn = make_recommend_fn(model, beam_width=width, k=width if exclude_history else k, renormalize=renormalize,
                           uniform_last_level=uniform_last_level)
    state = nnx.state(model)
    acc = MetricAccumulator(ks=ks, item_vectors=item_vectors)
    n = len(es) if not max_users else min(max_users, len(es))
    kwargs = {"options": options} if options is not None else {}
    batches = eval_batches(es, batch_size=batch_size, max_len=max_len, max_users=max_users, **kwargs)
    for batch in tqdm(batches, total=-(-n // batch_size), desc=desc, disable=not progress, leave=False):
        valid = batch["valid_rows"]
        dev = {key: np.asarray(v) for key, v in batch.items() if key not in HOST_ONLY_KEYS}
        if device_batch is not None:
            dev = device_batch(dev)
        items, _ = fn(state, dev, trie)
        items = np.asarray(items)
        if exclude_history:
            items = drop_history(items, batch["history_items"], k)
        items, targets = items[valid], batch["target_items"][valid]
        complete = (items > 0).all(1)
        acc.add(ranks_in_lists(items, targets, num_items), items[complete] if complete.any() else None)
    return acc.result(item_popularity=item_popularity, num_items=num_items)

"""Full-ranking evaluation of a trained model and of the baselines, on one EvalSet."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from genrec_jax.data.batching import eval_batches
from genrec_jax.data.sequences import EvalSet
from genrec_jax.data.types import EventSequences
from genrec_jax.eval.baselines import PopularityBaseline, TransitionBaseline, evaluate_baseline
from genrec_jax.eval.metrics import MetricAccumulator


def pad_histories(histories: list[np.ndarray], width: int | None = None) -> np.ndarray:
    width = width or max(1, max((len(h) for h in histories), default=1))
    out = np.zeros((len(histories), width), np.int32)
    for i, h in enumerate(histories):
        h = np.asarray(h)[-width:]
        out[i, : len(h)] = h
    return out


def evaluate_model(
    steps,  # train.step.StepBuilder
    params: Any,
    es: EvalSet,
    *,
    num_items: int,
    max_len: int,
    ks: list[int],
    batch_size: int,
    exclude_history: bool = False,
    max_users: int = 0,
    item_popularity: np.ndarray | None = None,
    item_vectors: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "eval",
    options=None,
) -> dict[str, float]:
    """HR@K / NDCG@K / MRR over the full catalogue, plus coverage, ILD, novelty and Gini."""
    k = min(max(ks), num_items)
    acc = MetricAccumulator(ks=ks, item_vectors=item_vectors)
    hist_width = max(1, int(es.history.lengths.max(initial=1))) if exclude_history else 1
    n = len(es) if not max_users else min(max_users, len(es))
    batches = eval_batches(es, batch_size=batch_size, max_len=max_len, max_users=max_users, options=options)
    for batch in tqdm(batches, total=-(-n // batch_size), desc=desc, disable=not progress, leave=False):
        valid = batch["valid_rows"]
        hist = pad_histories(batch["history_items"], hist_width) if exclude_history else None
        dev = steps.device_batch(batch)
        ranks, topk = steps.eval_step(params, dev, k, exclude_history,
                                      None if hist is None else steps.device_batch({"h": hist})["h"])
        ranks, topk = np.asarray(ranks), np.asarray(topk)
        acc.add(ranks[valid], topk[valid])
    return acc.result(item_popularity=item_popularity, num_items=num_items)


def evaluate_baselines(
    train: EventSequences,
    es: EvalSet,
    *,
    num_items: int,
    ks: list[int],
    exclude_history: bool = False,
    item_popularity: np.ndarray | None = None,
    item_vectors: np.ndarray | None = None,
    max_users: int = 0,
) -> dict[str, dict[str, float]]:
    """Popularity and first-order transition baselines fitted on ``train``."""
    rows = np.arange(len(es))
    if 0 < max_users < len(rows):
        rows = np.sort(np.random.default_rng(0).choice(rows, max_users, replace=False))
    histories = [es.history.row(int(r))["items"] for r in rows]
    targets = es.target_items[rows]
    out = {}
    for name, model in (("popularity", PopularityBaseline(num_items)), ("transition", TransitionBaseline(num_items))):
        model.fit(train)
        out[name] = evaluate_baseline(
            model, histories, targets, num_items, ks=tuple(ks), exclude_history=exclude_history,
            item_popularity=item_popularity, item_vectors=item_vectors,
        )
    return out


def format_table(rows: dict[str, dict[str, float]], keys: list[str]) -> str:
    """A plain-text table: one row per model, one column per metric."""
    name_w = max(8, max(len(n) for n in rows))
    head = f"{'model':<{name_w}} " + " ".join(f"{k:>9}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, res in rows.items():
        vals = " ".join(f"{res[k]:>9.4f}" if k in res and res[k] == res[k] else f"{'-':>9}" for k in keys)
        lines.append(f"{name:<{name_w}} {vals}")
    return "\n".join(lines)

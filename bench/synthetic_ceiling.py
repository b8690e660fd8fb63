#!/usr/bin/env python
"""How far a recommender can go on the built-in synthetic data: the Bayes ceiling.

    python bench/synthetic_ceiling.py                       # the default job's data and test split
    python bench/synthetic_ceiling.py --run runs/synthetic  # with that run's test rows beside it
        [--config configs/synthetic.yaml] [--set key=value ...] [--json rows.jsonl]

The generator knows how every event was drawn, so the next-item distribution given the
previous item, the user's cluster preference and the walk's latent current cluster is
exact (``genrec_jax.data.synthetic.next_item_probabilities``). Ranking by it is the best any
model can do on the test split (the Bayes ceiling). The same rule with the previous item's
own cluster in place of the latent one needs no hidden state; it is a strong rule, not a
bound. Both are printed beside the
popularity and item-transition baselines (fitted on the events the model trains on) under
the protocol of ``python train.py``'s test table: leave-one-out, the last event of each
user, full ranking over the catalogue, history kept or removed as ``eval.exclude_history``
says. With ``--run`` the rows of that run's test table (``metrics.jsonl``) are added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_rows  # noqa: E402
from genrec_jax.config import load_config, preset_path  # noqa: E402
from genrec_jax.data.registry import load_dataset  # noqa: E402
from genrec_jax.data.sequences import leave_one_out  # noqa: E402
from genrec_jax.data.synthetic import next_item_probabilities  # noqa: E402
from genrec_jax.eval.baselines import history_mask, top_k_items  # noqa: E402
from genrec_jax.eval.evaluate import evaluate_baselines, format_table  # noqa: E402
from genrec_jax.eval.metrics import MetricAccumulator, ranks_from_scores  # noqa: E402
from genrec_jax.train.loop import fit_sequences  # noqa: E402

COLUMNS = ["HR@10", "NDCG@10", "MRR"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="preset (default: configs/synthetic.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run", default=None, help="a finished run directory: add its test rows (metrics.jsonl)")
    p.add_argument("--json", default=None, help="write one JSON object per row here")
    return p.parse_args(argv)


def ceiling_metrics(ds, es, *, latent: bool, ks, exclude_history: bool, batch_size: int = 512) -> dict:
    """Test metrics of ranking by the generator's next-item distribution."""
    ex = ds.extras
    offsets = ds.sequences.offsets
    users = np.asarray(es.history.user_index, np.int64)
    prev_event = offsets[users] + es.history.lengths - 1  # the last history event, global index
    prev_items = ds.sequences.items[prev_event]
    clusters = ex["event_cluster"][prev_event] if latent else ex["item_cluster"][prev_items]
    acc = MetricAccumulator(ks)
    k_list = min(max(ks), ds.num_items)
    for s in range(0, len(users), batch_size):
        sl = slice(s, s + batch_size)
        scores = next_item_probabilities(ds, users[sl], prev_items[sl], clusters[sl])
        scores[:, 0] = -np.inf
        excl = None
        if exclude_history:
            excl = history_mask([es.history.row(int(r))["items"] for r in range(s, min(s + batch_size, len(users)))],
                                ds.num_items)
        acc.add(ranks_from_scores(scores, es.target_items[sl], excl), top_k_items(scores, k_list, excl))
    return acc.result(num_items=ds.num_items)


def run_rows(run_dir: Path) -> dict[str, dict[str, float]]:
    """The last test table a run wrote to its metrics.jsonl, by model."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"--run: {path} not found; give the directory `python train.py --out DIR` wrote")
    last = None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "test":
                last = rec
    if last is None:
        raise SystemExit(f"--run: {path} has no test table yet (the run did not finish its evaluation)")
    rows: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        if "/" in key:
            model, metric = key.split("/", 1)
            rows.setdefault(model, {})[metric] = value
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config or preset_path("synthetic"), args.overrides)
    if cfg.data.dataset != "synthetic":
        print(f"data.dataset is {cfg.data.dataset!r}: the ceiling needs the built-in synthetic data", file=sys.stderr)
        return 2
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    es = split.test
    ks, excl = list(cfg.eval.ks), cfg.eval.exclude_history
    rows = {}
    if args.run:
        rows.update({f"{name} (--run)": r for name, r in run_rows(Path(args.run)).items()
                     if name not in ("popularity", "transition")})
    rows["Bayes ceiling, latent cluster"] = ceiling_metrics(ds, es, latent=True, ks=ks, exclude_history=excl)
    rows["generator's rule, last item's cluster"] = ceiling_metrics(ds, es, latent=False, ks=ks, exclude_history=excl)
    rows.update(evaluate_baselines(fit_sequences(ds, split, cfg.data.fit), es, num_items=ds.num_items, ks=ks,
                                   exclude_history=excl))
    print(f"\nTest set, leave-one-out, full ranking over {ds.num_items} items, history items "
          f"{'removed' if excl else 'kept'} ({len(es)} users):")
    print(format_table(rows, COLUMNS))
    write_rows(args.json, [{"bench": "synthetic_ceiling", "model": name, "users": len(es),
                            **{k: v for k, v in r.items() if k in COLUMNS or "@" in k}} for name, r in rows.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Recommendation quality under the published protocols, our models beside the baselines.

    GENREC_DATA_DIR=/path/to/data python bench/quality.py --dataset beauty [--fit train+valid]
        [--models hstu,sasrec] [--set key=value ...] [--json rows.jsonl] [--plot curves.png]

Amazon Beauty (P5 split, the one TIGER reports on) and MovieLens-1M (the HSTU paper's),
leave-one-out, full ranking over the whole catalogue. One run trains each model with the
preset (configs/beauty.yaml or configs/ml1m.yaml) and prints, side by side: our HSTU, our
SASRec, popularity and the first-order item-transition baseline, all fitted on the same
events, plus the published rows of the same split for reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import pyplot, write_rows  # noqa: E402

from genrec_jax.config import ConfigError, load_config, preset_path  # noqa: E402

# Published rows on exactly these splits (Recall@5, NDCG@5, Recall@10, NDCG@10 / HR@10).
PUBLISHED = {
    "beauty": {
        "SASRec (TIGER paper)": {"HR@5": 0.0387, "NDCG@5": 0.0249, "HR@10": 0.0605, "NDCG@10": 0.0318},
        "TIGER (paper)": {"HR@5": 0.0454, "NDCG@5": 0.0321, "HR@10": 0.0648, "NDCG@10": 0.0384},
    },
    "ml1m": {
        "SASRec (HSTU paper)": {"HR@10": 0.2853},
        "HSTU (paper)": {"HR@10": 0.3097},
        "HSTU-large (paper)": {"HR@10": 0.3294},
    },
}
PRESET = {"beauty": "beauty", "ml1m": "ml1m", "synthetic": "synthetic"}
# SASRec as usually tuned on these sets: FFN width = embedding width, softmax attention
# (the width is filled in from the preset's model.embed_dim).
ARCH_OVERRIDES = {"hstu": [], "sasrec": ["model.arch=sasrec", "model.ffn_dim={embed_dim}", "model.attn_dropout=0.2"]}


def table(rows: dict[str, dict], cols: list[str]) -> str:
    w = max(len(n) for n in rows) + 2
    out = [f"{'model':<{w}}" + "".join(f"{c:>10}" for c in cols)]
    out.append("-" * len(out[0]))
    for name, r in rows.items():
        out.append(f"{name:<{w}}" + "".join(f"{r[c]:>10.4f}" if c in r else f"{'-':>10}" for c in cols))
    return "\n".join(out)


def plot_curves(runs: dict[str, Path], path: str) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    from genrec_jax.train.logging import read_metrics

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in runs.items():
        rows = read_metrics(d, "train")
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(PRESET), default="beauty")
    p.add_argument("--models", default="hstu,sasrec")
    p.add_argument("--fit", choices=["train", "train+valid"], default="train+valid",
                   help="events the models and baselines train on (train+valid: all but the test event)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--json", default=None, help="write one JSON object per row here")
    p.add_argument("--plot", default=None, help="PNG of the training curves")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    from genrec_jax.train.loop import run

    out_root = Path(args.out) / args.dataset
    rows: dict[str, dict] = {}
    runs: dict[str, Path] = {}
    timings = {}
    for arch in args.models.split(","):
        try:
            base = load_config(preset_path(PRESET[args.dataset]), args.overrides)
            arch_ov = [o.format(embed_dim=base.model.embed_dim) for o in ARCH_OVERRIDES[arch]]
            cfg = load_config(preset_path(PRESET[args.dataset]), [f"data.fit={args.fit}", *arch_ov, *args.overrides])
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        if args.dataset != "synthetic":
            d = cfg.data.resolved_dir()
            if d is None or not d.exists():
                print(f"{args.dataset}: data directory {d} not found; set GENREC_DATA_DIR (or --set data.data_dir=...). "
                      "Nothing was run.")
                return 0
        run_dir = out_root / arch
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        res = run(cfg, run_dir, progress=args.progress, log=lambda s: None)["results"]
        timings[arch] = time.perf_counter() - t0
        runs[arch] = run_dir
        model_name = "HSTU (ours)" if arch == "hstu" else "SASRec (ours)"
        first_model = next(iter(res))
        rows[model_name] = res[first_model]
        for base in ("popularity", "transition"):
            if base in res:
                rows[f"{base} baseline"] = res[base]
    for name, r in PUBLISHED.get(args.dataset, {}).items():
        rows[name] = r
    cols = ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"]
    print(f"\n{args.dataset}: leave-one-out, full ranking, fitted on {args.fit}, "
          f"exclude_history={cfg.eval.exclude_history}; "
          + ", ".join(f"{a} trained in {t:.0f} s" for a, t in timings.items()))
    print(table(rows, cols))
    print("(HR@K equals Recall@K with one held-out item per user.)")
    write_rows(args.json, [{"dataset": args.dataset, "model": name, "fit": args.fit,
                            **{k: v for k, v in r.items() if isinstance(v, (int, float))}} for name, r in rows.items()])
    if args.plot:
        plot_curves({f"{a}": d for a, d in runs.items()}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

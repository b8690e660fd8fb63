"""Pick hyper-parameters on the validation split, then report the test split once.

    GENREC_DATA_DIR=/path/to/data python bench/quality_sweep.py configs/sweeps/beauty.yaml \
        [--workers 4] [--json rows.jsonl] [--plot sweep.png] [--only hstu]

The protocol that keeps test numbers honest:

1. every candidate of the sweep file trains on ``data.fit=train`` (each user's events but
   the last two) and is scored on the validation event (the second-to-last), full ranking
   over the catalogue, every user;
2. per architecture, the candidate with the best validation ``select_by`` metric is
   trained again on ``train+valid`` (all but the last event) and scored once on the test
   event, beside popularity and item-transition baselines fitted on the same events.

The test split is never looked at while choosing. Candidates run in parallel processes
(``--workers``), which pays on a GPU where one small model leaves most of the chip idle.
The sweep file (YAML) names the dataset preset, the metric and the candidates:

    dataset: beauty
    select_by: NDCG@10
    exclude_history: true
    candidates:
      hstu:
        d64-l2: []
        d64-l2-dropout0.2: [model.dropout=0.2]
      sasrec:
        d64-l2: [model.arch=sasrec, model.ffn_dim=64]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

# Several processes share one GPU: let each take memory as it needs it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import pyplot, write_rows  # noqa: E402

from genrec_jax.config import ConfigError, load_config, preset_path  # noqa: E402

METRICS = ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"]


class SweepError(ValueError):
    pass


def read_sweep(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise SweepError(f"sweep file {p} not found")
    spec = yaml.safe_load(p.read_text()) or {}
    unknown = set(spec) - {"dataset", "select_by", "exclude_history", "common", "candidates"}
    if unknown:
        raise SweepError(f"{p}: unknown keys {sorted(unknown)}")
    for key in ("dataset", "candidates"):
        if key not in spec:
            raise SweepError(f"{p}: missing key '{key}'")
    spec.setdefault("select_by", "NDCG@10")
    spec.setdefault("exclude_history", True)
    spec.setdefault("common", [])
    if spec["select_by"] not in METRICS:
        raise SweepError(f"{p}: select_by must be one of {METRICS}, got {spec['select_by']!r}")
    for arch, cands in spec["candidates"].items():
        if not isinstance(cands, dict) or not cands:
            raise SweepError(f"{p}: candidates.{arch} must map names to lists of key=value overrides")
        for name, ov in cands.items():
            if not isinstance(ov, list) or not all(isinstance(s, str) and "=" in s for s in ov):
                raise SweepError(f"{p}: candidates.{arch}.{name} must be a list of 'key=value' strings")
    # Every candidate's config must load before anything trains.
    for arch, cands in spec["candidates"].items():
        for name, ov in cands.items():
            try:
                load_config(preset_path(spec["dataset"]), job_overrides(spec, ov, "train"))
            except ConfigError as e:
                raise SweepError(f"{p}: candidates.{arch}.{name}: {e}") from None
    return spec


def job_overrides(spec: dict, overrides: list[str], fit: str) -> list[str]:
    return [f"data.fit={fit}", f"eval.exclude_history={str(bool(spec['exclude_history'])).lower()}",
            "train.eval_every=0", "train.checkpoint_every=0", "eval.baselines=true",
            *spec["common"], *overrides]


def run_job(job: dict) -> dict:
    """One training run in a worker process: validation metrics, or test metrics (final)."""
    import numpy as np

    from genrec_jax.data.sequences import leave_one_out  # noqa: F401  (import order: jax after env)
    from genrec_jax.eval.evaluate import evaluate_model
    from genrec_jax.train import loop

    cfg = load_config(preset_path(job["dataset"]), job["overrides"])
    run_dir = Path(job["run_dir"])
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    out = {"arch": job["arch"], "name": job["name"], "phase": job["phase"], "overrides": job["overrides"]}
    if job["phase"] == "valid":
        ctx = loop.setup(cfg, run_dir, progress=False)
        try:
            loop.train_loop(ctx)
            res = evaluate_model(
                ctx.steps, ctx.state["params"], ctx.split.valid, num_items=ctx.dataset.num_items,
                max_len=cfg.data.max_seq_len, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size,
                exclude_history=cfg.eval.exclude_history, progress=False,
                options=loop.collate_options(cfg, ctx.dataset, train=False),
            )
        finally:
            ctx.logger.close()
            ctx.checkpointer.close()
        out["metrics"] = {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))}
    else:
        result = loop.run(cfg, run_dir, progress=False, log=lambda s: None)
        out["results"] = {m: {k: float(v) for k, v in r.items() if isinstance(v, (int, float, np.floating))}
                          for m, r in result["results"].items()}
        # The other history convention too, so readers can compare with either kind of table.
        other = not cfg.eval.exclude_history
        ctx = loop.setup(cfg, run_dir, resume=True, progress=False)
        try:
            res = evaluate_model(
                ctx.steps, ctx.state["params"], ctx.split.test, num_items=ctx.dataset.num_items,
                max_len=cfg.data.max_seq_len, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size,
                exclude_history=other, progress=False,
                options=loop.collate_options(cfg, ctx.dataset, train=False),
            )
            base = loop.evaluate_baselines(ctx.fit_events, ctx.split.test, num_items=ctx.dataset.num_items,
                                           ks=cfg.eval.ks, exclude_history=other)
        finally:
            ctx.logger.close()
            ctx.checkpointer.close()
        out["results_other_history"] = {"model": {k: float(v) for k, v in res.items() if isinstance(v, (int, float))},
                                        **{m: {k: float(v) for k, v in r.items() if isinstance(v, (int, float))}
                                           for m, r in base.items()}}
        out["exclude_history"] = bool(cfg.eval.exclude_history)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        results = []
        for j in jobs:
            results.append(run_job(j))
            report(results[-1])
        return results
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked jax runtime
    results = []
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run_job, jobs):
            report(r)
            results.append(r)
    return results


def report(r: dict) -> None:
    if r["phase"] == "valid":
        m = r["metrics"]
        print(f"  [{r['seconds']:6.0f} s] {r['arch']:>7} {r['name']:<28} valid "
              + " ".join(f"{k}={m[k]:.4f}" for k in METRICS if k in m), flush=True)
    else:
        print(f"  [{r['seconds']:6.0f} s] {r['arch']:>7} {r['name']:<28} final (train+valid -> test)", flush=True)


def table(rows: list[tuple[str, dict]], cols: list[str]) -> str:
    w = max(len(n) for n, _ in rows) + 2
    out = [f"{'':<{w}}" + "".join(f"{c:>9}" for c in cols)]
    out.append("-" * len(out[0]))
    for name, r in rows:
        out.append(f"{name:<{w}}" + "".join(f"{r[c]:>9.4f}" if c in r else f"{'-':>9}" for c in cols))
    return "\n".join(out)


def plot(valid: list[dict], metric: str, path: str) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    names = [f"{r['arch']}:{r['name']}" for r in valid]
    vals = [r["metrics"][metric] for r in valid]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, vals, color=["C0" if r["arch"] == "hstu" else "C1" for r in valid])
    ax.set_xlabel(f"validation {metric}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/beauty.yaml")
    p.add_argument("--workers", type=int, default=1, help="training processes at once")
    p.add_argument("--only", default=None, help="comma-separated architectures of the file to run")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--json", default=None, help="write one JSON object per row here")
    p.add_argument("--plot", default=None, help="PNG of the validation metric per candidate")
    p.add_argument("--selected", default=None, metavar="ARCH=NAME,...",
                   help="skip the validation phase and refit these candidates (chosen by an earlier "
                        "validation run of the same file) on train+valid for the test numbers")
    args = p.parse_args(argv)
    try:
        spec = read_sweep(args.sweep)
    except SweepError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    dataset = spec["dataset"]
    cfg0 = load_config(preset_path(dataset), [])
    if dataset != "synthetic":
        d = cfg0.data.resolved_dir()
        if d is None or not d.exists():
            print(f"{dataset}: data directory {d} not found; set GENREC_DATA_DIR (or common: "
                  "[data.data_dir=...] in the sweep file). Nothing was run.")
            return 0
    archs = list(spec["candidates"]) if not args.only else args.only.split(",")
    for a in archs:
        if a not in spec["candidates"]:
            print(f"--only: {a!r} is not an architecture of {args.sweep} ({list(spec['candidates'])})", file=sys.stderr)
            return 2
    out = Path(args.out) / dataset
    metric = spec["select_by"]
    t0 = time.perf_counter()

    best: dict[str, dict] = {}
    valid: list[dict] = []
    if args.selected:
        for item in args.selected.split(","):
            a, _, n = item.partition("=")
            if a not in archs or n not in spec["candidates"].get(a, {}):
                print(f"--selected: {item!r} is not ARCH=NAME of a candidate in {args.sweep}", file=sys.stderr)
                return 2
            best[a] = {"arch": a, "name": n}
        archs = [a for a in archs if a in best]
        print("validation phase skipped: refitting " + ", ".join(f"{a}={b['name']}" for a, b in best.items()))
    else:
        jobs = [{"dataset": dataset, "arch": a, "name": n, "phase": "valid",
                 "run_dir": str(out / "valid" / a / n), "overrides": job_overrides(spec, ov, "train")}
                for a in archs for n, ov in spec["candidates"][a].items()]
        print(f"{len(jobs)} candidates on the validation split, {args.workers} at a time", flush=True)
        valid = run_jobs(jobs, args.workers)
        order = {(j["arch"], j["name"]): i for i, j in enumerate(jobs)}
        valid.sort(key=lambda r: order[(r["arch"], r["name"])])
        for a in archs:
            rs = [r for r in valid if r["arch"] == a]
            best[a] = max(rs, key=lambda r: r["metrics"][metric])
    finals = [{"dataset": dataset, "arch": a, "name": best[a]["name"], "phase": "test",
               "run_dir": str(out / "test" / a),
               "overrides": job_overrides(spec, spec["candidates"][a][best[a]["name"]], "train+valid")}
              for a in archs]
    print(f"best on validation {metric}: " + ", ".join(f"{a}={best[a]['name']}" for a in archs), flush=True)
    final = run_jobs(finals, min(args.workers, len(finals)))
    final.sort(key=lambda r: archs.index(r["arch"]))

    label = {"hstu": "HSTU (ours)", "sasrec": "SASRec (ours)"}
    if valid:
        print(f"\n{dataset}: validation split (fit on train), every user, full ranking, "
              f"exclude_history={spec['exclude_history']}; selection by {metric}")
        print(table([(f"{r['arch']}:{r['name']}" + (" *" if best[r["arch"]] is r else ""), r["metrics"])
                     for r in valid], METRICS))
    rows_json = [{"dataset": dataset, "phase": "valid", "arch": r["arch"], "candidate": r["name"],
                  "selected": best[r["arch"]] is r, "seconds": r["seconds"], "overrides": r["overrides"],
                  **r["metrics"]} for r in valid]
    from bench.quality import PUBLISHED  # the published rows on the same split

    for exclude in (spec["exclude_history"], not spec["exclude_history"]):
        rows: list[tuple[str, dict]] = []
        for r in final:
            if exclude == r["exclude_history"]:
                model_row = next(iter(r["results"].values()))
                base = {k: v for k, v in r["results"].items() if k in ("popularity", "transition")}
            else:
                model_row = r["results_other_history"]["model"]
                base = {k: v for k, v in r["results_other_history"].items() if k != "model"}
            rows.append((f"{label.get(r['arch'], r['arch'])} [{r['name']}]", model_row))
            rows_json.append({"dataset": dataset, "phase": "test", "arch": r["arch"], "candidate": r["name"],
                              "exclude_history": exclude, "seconds": r["seconds"], **model_row})
        for k, v in base.items():  # baselines fitted on the same train+valid events
            rows.append((f"{k} baseline", v))
            rows_json.append({"dataset": dataset, "phase": "test", "arch": k, "candidate": "baseline",
                              "exclude_history": exclude, **v})
        for n, v in PUBLISHED.get(dataset, {}).items():
            rows.append((n, v))
        print(f"\n{dataset}: test split, fit on train+valid, every user, full ranking, exclude_history={exclude}")
        print(table(rows, METRICS))
    print(f"\nsweep took {time.perf_counter() - t0:.0f} s")
    write_rows(args.json, rows_json)
    if args.plot and valid:
        plot(valid, metric, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

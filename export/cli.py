"""Command line of ``python -m genrec_jax.export`` (here so it can be tested without a subprocess).

    python -m genrec_jax.export --checkpoint runs/tiny --out exports/tiny

exports every graph the checkpoint supports (fp32 + fp16), the side files and
``manifest.json``; then lints the graphs for TensorRT (``lint.json``), checks them against
the JAX model in ONNX Runtime on random and real inputs (``parity.json``), and writes the
Triton model repository (``triton/``) and ``README_serving.md``. Exit status 1 when the
lint or the parity check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from genrec_jax.export.onnx_export import DEFAULT_OPSET


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genrec_jax.export",
                                description="Export a trained checkpoint to ONNX for TensorRT / Triton serving.")
    p.add_argument("--checkpoint", required=True, help="training run directory (python train.py --out DIR)")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}: TensorRT 10.0 parses 9..20)")
    p.add_argument("--graphs", default=None, help="comma-separated subset of encoder,ranker,decode_step")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 variants")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the profiles (default: serve buckets)")
    p.add_argument("--opt-batch", type=int, default=None)
    p.add_argument("--max-candidates", type=int, default=None)
    p.add_argument("--beam-width", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None, help="retrieval top-k inside encoder.onnx (< 3840)")
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--parity-users", type=int, default=32, help="real users in the parity check")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton model repository")
    p.add_argument("--triton-backend", choices=("tensorrt", "onnxruntime"), default="tensorrt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from genrec_jax.export import parity, trt_lint
    from genrec_jax.export.onnx_export import export_model, limits_from_config
    from genrec_jax.train.restore import load_trained

    try:
        tm = load_trained(args.checkpoint, args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in {"max_batch": args.max_batch, "opt_batch": args.opt_batch,
                                   "max_candidates": args.max_candidates, "beam_width": args.beam_width,
                                   "top_k": args.top_k}.items() if v is not None}
    limits = limits_from_config(tm.cfg, **overrides)
    if limits.opt_batch > limits.max_batch:
        limits = dataclasses.replace(limits, opt_batch=limits.max_batch)
    out = Path(args.out)
    print(f"exporting {args.checkpoint} (step {tm.step}) to {out}, opset {args.opset}")
    only = tuple(args.graphs.split(",")) if args.graphs else None
    result = export_model(tm.model, out, info=tm.info, item_ids=tm.item_ids, opset=args.opset, fp16=not args.no_fp16,
                          limits=limits, checkpoint={"run_dir": str(Path(args.checkpoint).resolve()), "step": tm.step},
                          only=only)
    for name, why in result.manifest.skipped.items():
        print(f"  {name}: skipped ({why})")
    status = 0

    # The graphs this export wrote (not whatever else *.onnx sits in the folder).
    written = [f for g in result.manifest.graphs.values() for f in (g.file, g.fp16_file) if f]
    lint = {name: trt_lint.lint_model(out / name) for name in sorted(written)}
    (out / "lint.json").write_text(json.dumps({k: [dataclasses.asdict(i) for i in v] for k, v in lint.items()},
                                              indent=2) + "\n")
    n_err = sum(i.severity == "error" for v in lint.values() for i in v)
    print(f"TensorRT lint: {len(lint)} graphs, {n_err} errors" + ("" if not n_err else " (lint.json)"))
    for v in lint.values():
        for i in v:
            print(f"  {i}")
    status |= 1 if n_err else 0

    if not args.no_parity:
        try:
            batch = parity.real_histories(tm, args.parity_users)
        except FileNotFoundError as e:  # data set not on this machine: random inputs only
            print(f"  parity on random inputs only: {e}")
            batch = None
        reports = parity.check_export(result, tm.model, batch)
        (out / "parity.json").write_text(json.dumps([r.to_json() for r in reports], indent=2) + "\n")
        print("ONNX Runtime parity (max relative error vs JAX):")
        for r in reports:
            print(f"  {r.graph:12s} {r.precision} {r.inputs:22s} {r.max_error:.2e} "
                  f"{'ok' if r.ok() else 'FAIL'} (<= {parity.TOLERANCE[r.precision]:g})")
        status |= 0 if all(r.ok() for r in reports) else 1

    from genrec_jax.export.serving_readme import render_readme

    (out / "README_serving.md").write_text(render_readme(result.manifest, export_dir=out))
    if not args.no_triton:
        from genrec_jax.export.triton_repo import write_repository

        repo = write_repository(out, backend=args.triton_backend)
        print(f"Triton model repository: {repo}")
    print(f"done in {result.seconds:.0f} s (export); manifest: {out / 'manifest.json'}")
    return status

"""Command line of ``python train.py`` (kept here so it can be tested without a subprocess)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genrec_jax.config import ConfigError, load_config, preset_path

STAGES = ("ugt", "rqvae", "dpo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a genrec-jax model. With no arguments: the 'synthetic' preset on built-in data.",
    )
    p.add_argument("--config", default=None, help="YAML preset (default: configs/synthetic.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.num_layers=4 (repeatable)")
    p.add_argument("--out", default=None, help="run directory for checkpoints and logs (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stage", choices=STAGES, default=None, help="training stage (default: train.stage of the config)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only: parameter count, memory per device and FLOPs for --mesh, no allocation")
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=8,fsdp=2,tensor=2,expert=1")
    p.add_argument("--device-memory-gb", type=float, default=80.0,
                   help="device memory the --dry-run plan must fit (GiB per device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_path = Path(args.config) if args.config else preset_path("synthetic")
    overrides = list(args.overrides)
    if args.stage:
        overrides.append(f"train.stage={args.stage}")
    if args.mesh:
        from genrec_jax.sharding import parse_mesh_arg

        try:
            overrides += [f"mesh.{k}={v}" for k, v in parse_mesh_arg(args.mesh).items()]
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / config_path.stem
    if args.dry_run:
        from genrec_jax.planning import dry_run_main

        return dry_run_main(cfg, device_memory_gb=args.device_memory_gb, mesh_arg=args.mesh)

    from genrec_jax.train.loop import RunDirError, TrainingDiverged

    stage = cfg.train.stage
    try:
        if stage == "ugt":
            from genrec_jax.train.loop import run

            run(cfg, out, resume=args.resume, progress=not args.no_progress)
        elif stage == "rqvae":
            from genrec_jax.semantic_ids.train_rqvae import run_rqvae

            run_rqvae(cfg, out, resume=args.resume, progress=not args.no_progress)
        elif stage == "dpo":
            from genrec_jax.train.dpo import run_dpo

            run_dpo(cfg, out, progress=not args.no_progress)
    except (TrainingDiverged, RunDirError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nrun directory: {out}  (metrics.jsonl, tb/, checkpoints/)")
    return 0

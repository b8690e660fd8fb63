"""Command line of ``python serve.py`` (here, so it is testable without a subprocess)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from genrec_jax.config import ConfigError, ServeConfig

DEFAULT_RUN = Path("runs") / "synthetic"  # where a plain `python train.py` writes

NO_CHECKPOINT = """\
serve.py needs a trained checkpoint, and none was given or found at {default}.

  python train.py                      # trains the default preset into {default} (minutes on a CPU)
  python serve.py                      # then serves it on http://127.0.0.1:8000

or point it at any run directory:  python serve.py --checkpoint DIR
(quick test run:  python train.py --config configs/tiny.yaml --out /tmp/tiny && python serve.py --checkpoint /tmp/tiny)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve a trained genrec-jax checkpoint over HTTP.")
    p.add_argument("--checkpoint", default=None,
                   help=f"run directory written by train.py (default: {DEFAULT_RUN}, if present)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="override a serving setting, e.g. --set serve.batch_buckets=[1,8,64] (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--limit-concurrency", type=int, default=None,
                   help="requests in flight before uvicorn answers 503 at once (default: serve.queue_size + "
                        "2 x the largest batch bucket + 16): bounds the work admitted when the HTTP layer, "
                        "not the model, is the bottleneck (with --workers: per front end, default 4 x its "
                        "in-flight cap + 64)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="HTTP front-end processes (sets serve.http_workers). 0 or 1: one process serves HTTP and "
                        "runs the engine; N >= 2: N processes parse HTTP and forward to one engine process")
    return p


def is_run_dir(path: Path) -> bool:
    ckpt = path / "checkpoints"
    return (path / "config.yaml").is_file() and ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def resolve_checkpoint(arg: str | None, out=print) -> Path | None:
    """The run directory to serve, or None (after telling the user what to do)."""
    if arg is None:
        if is_run_dir(DEFAULT_RUN):
            out(f"no --checkpoint given: serving {DEFAULT_RUN}, the run `python train.py` wrote")
            return DEFAULT_RUN
        out(NO_CHECKPOINT.format(default=DEFAULT_RUN))
        return None
    path = Path(arg)
    if not is_run_dir(path):
        out(f"error: {path} is not a finished training run (needs config.yaml and checkpoints/<step>/).\n\n"
            + NO_CHECKPOINT.format(default=DEFAULT_RUN))
        return None
    return path


def serve_config(run_dir: Path, overrides: list[str]) -> ServeConfig:
    """The run's serving section with ``serve.*`` overrides (no model loaded)."""
    from genrec_jax.config import load_config

    bad = [o for o in overrides if not o.strip().startswith("serve.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only serve.* settings can change at serving time")
    return load_config(run_dir / "config.yaml", overrides).serve


def build_app(run_dir: Path, overrides: list[str]):
    """The FastAPI app for a run directory; the engine loads and compiles at start-up."""
    from genrec_jax.serve.app import create_app
    from genrec_jax.serve.engine import Engine

    cfg = serve_config(run_dir, overrides)
    return create_app(cfg, lambda: Engine.from_checkpoint(run_dir, overrides))


def apply_gil_switch_interval(cfg: ServeConfig) -> float:
    """Set Python's GIL switch interval from ``serve.gil_switch_interval_ms`` (0: Python's
    default 5 ms); returns the interval set, in seconds. The batcher thread hands results
    back to the event loop: a short interval keeps that hand-off from waiting out a busy
    thread's whole slice."""
    interval = cfg.gil_switch_interval_ms / 1e3 if cfg.gil_switch_interval_ms > 0 else 0.005
    sys.setswitchinterval(interval)
    return interval


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = resolve_checkpoint(args.checkpoint, out=lambda m: print(m, file=sys.stderr))
    if run_dir is None:
        return 2
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"serve.http_workers={args.workers}")
    try:
        cfg = serve_config(run_dir, overrides)
        app = build_app(run_dir, overrides) if cfg.http_workers < 2 else None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    apply_gil_switch_interval(cfg)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):  # checkpoint-restore chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if cfg.http_workers >= 2:
        return serve_multiprocess(run_dir, overrides, cfg, args)
    limit = args.limit_concurrency or cfg.queue_size + 2 * max(cfg.batch_buckets) + 16
    import uvicorn

    print(f"serving {run_dir} on http://{args.host}:{args.port}  (ready when GET /readyz is 200; API at /docs)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                limit_concurrency=limit, timeout_graceful_shutdown=10)
    return 0


def serve_multiprocess(run_dir: Path, overrides: list[str], cfg: ServeConfig, args: argparse.Namespace) -> int:
    """``serve.http_workers`` HTTP front-end processes and the engine in this one
    (``supervisor.py``)."""
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.supervisor import Supervisor

    print(f"serving {run_dir} on http://{args.host}:{args.port} with {cfg.http_workers} HTTP front-end processes "
          "(ready when GET /readyz is 200; API at /docs)", file=sys.stderr)
    sup = Supervisor(cfg, lambda: Engine.from_checkpoint(run_dir, overrides), workers=cfg.http_workers,
                     host=args.host, port=args.port, log_level=args.log_level,
                     limit_concurrency=args.limit_concurrency)
    return sup.run()

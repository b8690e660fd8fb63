#!/usr/bin/env python
"""MoE FFN routings side by side: forward and forward+backward time of the same routing.

    python bench/moe.py                                  # the base preset's MoE layer
    python bench/moe.py --tokens 32768,16384 --routings blocked,blocked-triton,dropless,dense --json rows.jsonl

Every row runs one routing of ``MoEFFN`` (``blocked``: expert groups padded to blocks and
one batched matmul, each block's expert weights copied by a one-hot product;
``blocked-triton``: the same blocks through the Triton grouped matmul, ``moe.kernel=triton``,
skipped without a CUDA GPU and jax-triton; ``dropless``: ``jax.lax.ragged_dot``; ``dense``:
every expert on every token) on the same tokens and weights, after checking that its output equals the
``blocked`` one. TFLOP/s counts the *model* FLOPs (the k chosen experts per token, 2 matmuls
of 2·D·F each; the backward twice the forward), so a routing that computes more than that
shows up as a lower rate. ``xla dots`` is the FLOP count of the compiled program's matrix
products as XLA reports it (cost analysis), against the model count: how much work the
routing really asks for. Median of ``--iters`` timed calls after one warm-up; ``--plot``
draws time against tokens per routing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import print_trace_summary, pyplot, summarize_trace, write_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="32768", help="tokens per call, comma-separated (base step: 64 x 512)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--expert-dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--routings", default="blocked,blocked-triton,dropless,dense")
    p.add_argument("--block-sizes", default="512", help="blocked: rows per block, comma-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: time against tokens")
    p.add_argument("--profile", default=None,
                   help="DIR: a jax.profiler trace of 5 forward+backward calls per row, and where their device "
                        "time goes (kernel classes, top kernels; with XLA_FLAGS=--xla_gpu_enable_command_buffer= "
                        "each fusion is its own row)")
    return p.parse_args(argv)


def _time(fn, *args, iters: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dot_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 -- not every backend reports it
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from genrec_jax.config import MoEConfig
    from genrec_jax.model.moe import HAS_RAGGED_DOT, MoEFFN

    dtype = jnp.dtype(args.dtype)
    routings = [r for r in args.routings.split(",") if r]
    if "dropless" in routings and not HAS_RAGGED_DOT:
        print("this JAX has no jax.lax.ragged_dot: the dropless rows are skipped")
        routings.remove("dropless")
    from genrec_jax.ops.hstu_attention import triton_available

    if "blocked-triton" in routings and not triton_available():
        print("no CUDA GPU with jax-triton: the blocked-triton rows are skipped")
        routings.remove("blocked-triton")
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_dim=args.expert_dim)
    dev = jax.devices()[0]
    print(f"# moe: {dev.device_kind}, jax {jax.__version__}, D={args.dim} F={args.expert_dim} "
          f"E={args.experts} k={args.top_k} {dtype.name}")
    variants = []
    for r in routings:
        sizes = [int(b) for b in args.block_sizes.split(",")] if r.startswith("blocked") else [cfg.block_size]
        variants += [(r, b) for b in sizes]
    rows = []
    for n_tok in [int(t) for t in args.tokens.split(",")]:
        x = jax.random.normal(jax.random.key(0), (n_tok, args.dim), jnp.float32).astype(dtype)
        model_fwd = 2.0 * n_tok * args.top_k * 2 * args.dim * args.expert_dim
        ref = None
        for routing, block in variants:
            kernel = "triton" if routing == "blocked-triton" else "xla"
            moe = MoEFFN(args.dim, dataclasses.replace(cfg, block_size=block, kernel=kernel), rngs=nnx.Rngs(0),
                         dtype=dtype)
            gd, params = nnx.split(moe)

            def fwd(p, x, routing=routing.removesuffix("-triton")):
                return nnx.merge(gd, p)(x, routing=routing)[0]

            def loss(p, x):
                return jnp.sum(jnp.square(fwd(p, x).astype(jnp.float32)))

            f = jax.jit(fwd)
            g = jax.jit(jax.grad(loss, argnums=(0, 1)))
            y = np.asarray(f(params, x), np.float32)
            if not np.all(np.isfinite(y)):
                raise SystemExit(f"{routing}: non-finite output")
            if ref is None:
                ref = y
            err = float(np.max(np.abs(y - ref)) / max(1e-6, float(np.max(np.abs(ref)))))
            t_f = _time(f, params, x, iters=args.iters)
            t_b = _time(g, params, x, iters=args.iters)
            dots_f = _dot_flops(f.lower(params, x).compile())
            if args.profile:
                prof = str(Path(args.profile) / f"{routing}-{block}-{n_tok}")
                jax.profiler.start_trace(prof, create_perfetto_trace=True)
                for _ in range(5):
                    jax.block_until_ready(g(params, x))
                jax.profiler.stop_trace()
                summary = summarize_trace(prof, 5, top=30)
                print_trace_summary(summary, f"{routing} (block {block}), {n_tok} tokens, forward+backward")
                rows += [{"bench": "moe_profile", "routing": routing, "tokens": n_tok, **r} for r in summary]
            row = {"bench": "moe", "device": dev.device_kind, "tokens": n_tok, "routing": routing,
                   "block_size": block if routing.startswith("blocked") else None, "dtype": dtype.name,
                   "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_b,
                   "fwd_tflops": model_fwd / t_f / 1e12, "fwd_bwd_tflops": 3 * model_fwd / t_b / 1e12,
                   "xla_flops_over_model": None if dots_f is None else dots_f / model_fwd,
                   "max_rel_diff_vs_first": err}
            rows.append(row)
    rows, prof_rows = [r for r in rows if r["bench"] == "moe"], [r for r in rows if r["bench"] != "moe"]
    base = {(r["tokens"]): r for r in rows if r["routing"] == "dropless"}
    hdr = (f"{'tokens':>7} {'routing':>9} {'block':>6} {'fwd ms':>8} {'TF/s':>6} {'f+b ms':>8} {'TF/s':>6} "
           f"{'x dropless f+b':>14} {'xla/model':>9} {'diff':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        b = base.get(r["tokens"])
        r["speedup_vs_dropless"] = None if b is None else b["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        sp = "-" if r["speedup_vs_dropless"] is None else f"{r['speedup_vs_dropless']:.2f}x"
        xm = "-" if r["xla_flops_over_model"] is None else f"{r['xla_flops_over_model']:.2f}"
        print(f"{r['tokens']:>7} {r['routing']:>9} {r['block_size'] or '-':>6} {r['fwd_ms']:>8.3f} "
              f"{r['fwd_tflops']:>6.1f} {r['fwd_bwd_ms']:>8.3f} {r['fwd_bwd_tflops']:>6.1f} {sp:>14} {xm:>9} "
              f"{r['max_rel_diff_vs_first']:>8.1e}")
    write_rows(args.json, rows + prof_rows)
    if args.plot:
        plt = pyplot(args.plot)
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            for key in sorted({(r["routing"], r["block_size"]) for r in rows}, key=str):
                pts = sorted((r["tokens"], r["fwd_bwd_ms"]) for r in rows if (r["routing"], r["block_size"]) == key)
                ax.plot(*zip(*pts), marker="o", label=key[0] + (f" M={key[1]}" if key[1] else ""))
            ax.set_xlabel("tokens")
            ax.set_ylabel("forward+backward ms")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend()
            ax.set_title(f"MoE FFN, {dev.device_kind}")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

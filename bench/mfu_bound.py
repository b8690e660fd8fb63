"""The highest MFU a config's train step can reach with each attention backend.

    python bench/mfu_bound.py [--config configs/base.yaml] [--set key=value ...]
        [--attention xla,triton] [--rounds 5] [--json rows.jsonl]

A train step cannot take less than its attention (forward + backward, timed here on the
config's shape: batch x max_seq_len full-length rows, its heads, widths, relative biases,
norm, query blocks and dtype) plus the rest of its model FLOPs run at the device's measured
matmul peak, with everything else -- normalisation, activations, dropout, routing, the
optimizer -- taking no time at all:

    step >= layers x t_attention + (F_step - F_attention) / peak
    MFU  <= F_step / (step x peak)

where F_step is the step's model FLOPs (``genrec_jax.planning.flops_per_token`` x 3 x
tokens, as ``bench/train_throughput.py`` counts them) and F_attention that count's
attention products (``attention_flops_per_token`` x 3 x tokens). When that ceiling is below
an MFU goal, no work outside the attention can reach the goal; only a faster attention can.

Times are the steady state of ``--reps`` calls dispatched back to back (one wait at the end),
median over ``--rounds``; the peak is the best of a few large bf16 products
(``train_throughput.measure_peak_tflops``), or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_rows  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from genrec_jax.config import load_config, preset_path  # noqa: E402
from genrec_jax.planning import attention_flops_per_token, flops_per_token  # noqa: E402


def attention_step(cfg, backend: str):
    """(jit'ed forward + backward of one layer's attention at the config's training shape,
    its inputs). Gradients of q, k, v and the bias tables, as the train step takes them."""
    from genrec_jax.ops.hstu_attention import hstu_attention

    m, b, n = cfg.model, cfg.data.batch_size, cfg.data.max_seq_len
    if m.arch != "hstu":
        raise SystemExit("mfu_bound: only the HSTU encoder (model.arch=hstu) is covered")
    dt = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((b, n, m.num_heads, m.attn_dim)), dt) for _ in range(2))
    v, w = (jnp.asarray(rng.standard_normal((b, n, m.num_heads, m.linear_dim)), dt) for _ in range(2))
    lengths = jnp.full((b,), n, jnp.int32)
    ts = np.cumsum(rng.integers(1, 3600, (b, n)), axis=1).astype(np.int32)
    qts = jnp.asarray(np.concatenate([ts[:, 1:], ts[:, -1:] + 60], 1))
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32) * 0.1) if m.rab_position else None
    tb = jnp.asarray(rng.standard_normal(m.num_time_buckets).astype(np.float32) * 0.1) if m.rab_time else None
    extra = dict(remat=m.attention_remat, query_block=m.attention_query_block) if backend == "xla" else {}

    def loss(q, k, v, pos, tb):
        out = hstu_attention(q, k, v, lengths, max_len=n, norm=m.attn_norm, pos_bias=pos, time_bias=tb,
                             timestamps=jnp.asarray(ts) if tb is not None else None,
                             query_timestamps=qts if tb is not None else None, backend=backend, **extra)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return grad, (q, k, v, pos, tb)


def steady_ms(fn, args, reps: int, rounds: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(reps)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="base", help="preset name or YAML path (default: base)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--attention", default="xla,triton", help="comma list of backends: xla, triton")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--num-items", type=int, default=None,
                    help="catalogue size for the FLOP count (default: the synthetic config's num_items)")
    ap.add_argument("--json", help="write one JSON object per row to this path")
    args = ap.parse_args(argv)

    path = args.config if args.config.endswith((".yaml", ".yml")) else preset_path(args.config)
    cfg = load_config(path, args.overrides)
    from bench.train_throughput import measure_peak_tflops

    peak = args.peak_tflops or measure_peak_tflops()
    num_items = args.num_items or cfg.data.synthetic.num_items
    tokens = cfg.data.batch_size * cfg.data.max_seq_len
    f_step = 3 * flops_per_token(cfg, num_items) * tokens
    f_attn = 3 * attention_flops_per_token(cfg) * tokens
    rest_ms = (f_step - f_attn) / (peak * 1e12) * 1e3
    dev = jax.devices()[0]
    print(f"{Path(path).stem} on {dev.device_kind}: measured matmul peak {peak:.1f} TFLOP/s; step "
          f"{f_step / 1e12:.3f} TFLOP of model FLOPs, attention products {f_attn / f_step:.1%} of them; "
          f"the rest at the peak: {rest_ms:.2f} ms")
    rows = []
    for backend in args.attention.split(","):
        if backend == "triton" and dev.platform != "gpu":
            print(f"{backend}: skipped (needs a CUDA GPU)")
            continue
        fn, inputs = attention_step(cfg, backend)
        attn_ms = steady_ms(fn, inputs, args.reps, args.rounds)
        floor = cfg.model.num_layers * attn_ms + rest_ms
        rows.append(dict(bench="mfu_bound", config=Path(path).stem, device=dev.device_kind, backend=backend,
                         attention_ms_per_layer=attn_ms, attention_ms_per_step=cfg.model.num_layers * attn_ms,
                         rest_at_peak_ms=rest_ms, step_floor_ms=floor,
                         mfu_ceiling=f_step / (floor * 1e-3) / (peak * 1e12), peak_tflops_measured=peak,
                         step_tflop=f_step / 1e12, attention_share_of_flops=f_attn / f_step,
                         batch=cfg.data.batch_size, seq_len=cfg.data.max_seq_len))
    print(f"{'attention':10s} {'ms/layer':>9s} {'ms/step':>8s} {'rest@peak':>10s} {'step >=':>8s} {'MFU <=':>7s}")
    for r in rows:
        print(f"{r['backend']:10s} {r['attention_ms_per_layer']:9.3f} {r['attention_ms_per_step']:8.2f} "
              f"{r['rest_at_peak_ms']:10.2f} {r['step_floor_ms']:8.2f} {r['mfu_ceiling']:7.1%}")
    write_rows(args.json, rows)
    return 0 if rows and all(math.isfinite(r["mfu_ceiling"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Latency of the exported graphs in ONNX Runtime beside the XLA serving engine, same model and batch.

    python bench/export_bench.py --checkpoint runs/tiny [--batch 1,16] [--beam-width 16] [--k 10]
        [--iters 30] [--threads 2] [--json rows.jsonl]

Rows (per batch size B, histories of the checkpoint's own data set padded to max_len):

* ``encoder``: the encoder forward pass and the retrieval top-k.
    onnxruntime   encoder.onnx (states, user vector, logits, top-k, K/V caches) in one session;
    xla-jit       the same exported function (``graphs.encoder_graph``), ``jax.jit``-compiled;
    xla-engine    ``Engine.recommend_batch(mode="retrieval")``: the serving engine's whole
                  request path (padding, prefill into its K/V slot pool, top-k on the host).
* ``beam_search``: encoder + trie-constrained beam search (W beams, k results).
    onnxruntime   ``OnnxRecommender.recommend``: encoder.onnx, then one decode_step.onnx per
                  level driven from NumPy (the reference client's loop);
    xla-engine    ``Engine.recommend_batch(mode="generative")`` (one compiled executable).

Without a semantic-ID decoder in the checkpoint, ``--random-decoder`` attaches a randomly
initialised one (1 layer, synthetic codes): latency only, its recommendations mean nothing.

Encoder FLOPs (reported as GFLOP/s; multiply-adds x 2, embeddings and norms ignored), per
layer with D = embed dim, H heads, dqk / dv per-head widths, L tokens:
    projection 2*B*L*D*H*(2*dv + 2*dqk) + attention 2*B*H*L*L*(dqk + dv) + output 2*B*L*H*dv*D,
plus the retrieval scores 2*B*D*(N + 1). Latencies are wall-clock medians (p50) and p90 over
``--iters`` calls after 3 warm-up calls, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_rows  # noqa: E402


def encoder_flops(model, b: int, l_: int) -> float:
    c = model.cfg
    h, dq, dv, d = c.num_heads, c.attn_dim, c.linear_dim, c.embed_dim
    per_layer = 2 * b * l_ * d * h * (2 * dv + 2 * dq) + 2 * b * h * l_ * l_ * (dq + dv) + 2 * b * l_ * h * dv * d
    return c.num_layers * per_layer + 2 * b * d * (model.num_items + 1)


def timed(fn, iters: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return np.asarray(out)


def attach_random_decoder(model, seed: int = 0):
    """The model with a small randomly initialised semantic-ID decoder (latency runs only)."""
    import jax.numpy as jnp
    from flax import nnx

    from genrec_jax.semantic_ids.decoder import ItemCodes, SemanticIDDecoder

    n = model.num_items
    sizes = (16, 16, max(2, int(np.ceil((n + 1) / 256))))
    ids = np.arange(n + 1)
    codes = np.stack([(ids // (sizes[2] * 16)) % 16, (ids // sizes[2]) % 16, ids % sizes[2]], 1).astype(np.int32)
    dec = dataclasses.replace(model.cfg.decoder, enabled=True, num_layers=1)
    m = nnx.clone(model)
    m.cfg = dataclasses.replace(model.cfg, decoder=dec)
    m.decoder = nnx.data(SemanticIDDecoder(model.cfg.embed_dim, sizes, dec, moe=model.cfg.moe, rngs=nnx.Rngs(seed)))
    m.item_codes = nnx.data(ItemCodes(jnp.asarray(codes)))
    return m


def histories_for(tm, n: int):
    from genrec_jax.export.parity import real_histories
    from genrec_jax.serve.inputs import History

    batch = real_histories(tm, max(n * 2, 8))
    out = []
    for r in range(len(batch["lengths"])):
        L = int(batch["lengths"][r])
        if L:
            out.append(History.from_arrays(batch["items"][r, :L], batch["actions"][r, :L], batch["timestamps"][r, :L],
                                           request_ts=int(batch["query_timestamps"][r, L - 1])))
    while len(out) < n:
        out += out
    return out[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training run directory")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--beam-width", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--random-decoder", action="store_true", help="attach a random decoder if the model has none")
    ap.add_argument("--export-dir", default=None, help="reuse (or keep) the export here")
    ap.add_argument("--json", default=None, help="write one JSON object per row here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from genrec_jax.config import ServeConfig
    from genrec_jax.export.graphs import ExportLimits, build_graphs, prepare_model
    from genrec_jax.export.onnx_export import export_model
    from genrec_jax.export.ort_client import OnnxRecommender
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.inputs import Catalog, pad_batch
    from genrec_jax.train.restore import load_trained

    tm = load_trained(args.checkpoint)
    model = tm.model
    if getattr(model, "decoder", None) is None and args.random_decoder:
        model = attach_random_decoder(model)
    generative = getattr(model, "decoder", None) is not None
    batches = [int(b) for b in args.batch.split(",")]
    w = args.beam_width
    export_dir = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="export_bench_"))
    if not (export_dir / "manifest.json").exists():
        only = ("encoder", "decode_step") if generative else ("encoder",)
        export_model(model, export_dir, info=tm.info, item_ids=tm.item_ids, fp16=False, only=only, log=lambda *a: None,
                     limits=ExportLimits(max_batch=max(batches), opt_batch=max(batches), beam_width=w,
                                         top_k=args.k))
    client = OnnxRecommender(export_dir, threads=args.threads)
    serve = ServeConfig(batch_buckets=batches, seq_buckets=[model.max_len], extend_buckets=[1], rank_micro_batch=8,
                        max_candidates=8, prefix_cache_users=0, beam_width=w, max_k=max(args.k, w),
                        max_exclude=8)
    t0 = time.perf_counter()
    engine = Engine(model, Catalog(tm.item_ids, tm.info.get("action_names", ())), serve)
    print(f"engine compiled in {time.perf_counter() - t0:.0f} s; ONNX Runtime threads {args.threads}, "
          f"JAX devices {jax.devices()}", file=sys.stderr)
    graphs, _ = build_graphs(prepare_model(model), ExportLimits(top_k=args.k))
    enc = next(g for g in graphs if g.name == "encoder")
    enc_jit = jax.jit(enc.fn)

    rows = []

    def row(component, backend, b, ms, flops=None, note=""):
        r = {"component": component, "backend": backend, "batch": b, "p50_ms": float(np.median(ms)),
             "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "iters": len(ms),
             "rows_per_s": float(b / (np.median(ms) / 1e3))}
        if flops:
            r["gflop_per_s"] = float(flops / (np.median(ms) / 1e3) / 1e9)
        if note:
            r["note"] = note
        rows.append(r)

    for b in batches:
        hist = histories_for(tm, b)
        feeds = pad_batch(hist, b, model.max_len, model.max_len)
        enc_feeds = {t.name: feeds[t.name] for t in enc.inputs}
        flops = encoder_flops(model, b, model.max_len)
        row("encoder", "onnxruntime", b, timed(lambda: client.retrieve(enc_feeds, args.k), args.iters), flops)
        args_j = [jnp.asarray(enc_feeds[t.name]) for t in enc.inputs]
        row("encoder", "xla-jit", b,
            timed(lambda: jax.block_until_ready(enc_jit(*args_j)), args.iters), flops)
        row("encoder", "xla-engine", b,
            timed(lambda: engine.recommend_batch(hist, k=args.k, mode="retrieval"), args.iters), flops,
            "whole request path")
        if generative:
            row("beam_search", "onnxruntime", b,
                timed(lambda: client.recommend(enc_feeds, k=args.k, beam_width=w), args.iters),
                note=f"W={w}, k={args.k}, {model.decoder.num_levels} decode steps")
            row("beam_search", "xla-engine", b,
                timed(lambda: engine.recommend_batch(hist, k=args.k, mode="generative"), args.iters),
                note=f"W={w}, k={args.k}")

    header = (f"{'component':12s} {'backend':12s} {'batch':>5s} {'p50 ms':>9s} {'p90 ms':>9s} {'rows/s':>9s} "
              f"{'GFLOP/s':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gf = f"{r['gflop_per_s']:8.2f}" if "gflop_per_s" in r else f"{'':8s}"
        print(f"{r['component']:12s} {r['backend']:12s} {r['batch']:5d} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} "
              f"{r['rows_per_s']:9.1f} {gf}")
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

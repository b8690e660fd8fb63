#!/usr/bin/env python
"""In-process serving benchmark (no HTTP): the engine at each batch bucket vs every
optimisation off.

For each mode -- ``recommend`` (retrieval head top-k), ``generative`` (trie-constrained
beam search over semantic IDs), ``rank`` (M-FALCON, --rank-candidates per request) and
``returning`` (recommend for users whose K/V prefix is cached, --new-events new events) and
``new-users`` (recommend with a user id never seen before: the whole history is encoded into
the prefix cache's K/V pool, then the retrieval step reads the pool; the path of HTTP load
that names users, where ``recommend`` without a user id runs one fused step) -- and each
batch size B, the engine runs batches of B requests back to back:

    latency    = wall time of one batch (every request of it answers then), p50 / p99
    throughput = B / mean batch time  (requests/s)

then the same model through ``NaiveEngine`` (one request at a time, exact shapes, no
prefix cache, beam search recomputing every level, ranking re-encoding the history per
candidate micro-batch); the speed-up is best engine throughput / naive throughput.

FLOPs (stated, not measured): an HSTU layer costs per token 2·D·H·(2·dv + 2·dqk) (W1) +
2·H·dv·D (W2) and per attended pair 2·H·(dqk + dv); a prefill of n tokens attends
n(n+1)/2 pairs; retrieval adds 2·N·D per request (N items). The table's TFLOP/s column is
that model FLOP count / time (``recommend`` rows only).

Examples:
    python bench/serve_engine.py --config configs/base.yaml                 # the GPU numbers
    python bench/serve_engine.py --config configs/tiny.yaml --history-len 16 --batch-buckets 1,4,16 \\
        --rank-candidates 64 --beam 8 --iters 20 --json /tmp/serve_engine.jsonl   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import pyplot, write_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="preset YAML (default: configs/base.yaml, else tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--history-len", type=int, default=256)
    p.add_argument("--num-items", type=int, default=None, help="catalogue size (default: the preset's data)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beam", type=int, default=16)
    p.add_argument("--batch-buckets", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--rank-candidates", type=int, default=1000)
    p.add_argument("--rank-micro-batch", type=int, default=256)
    p.add_argument("--new-events", type=int, default=2, help="returning users: events since their last request")
    p.add_argument("--modes", default="recommend,generative,rank,returning,new-users")
    p.add_argument("--iters", type=int, default=30, help="timed batches per (mode, batch size)")
    p.add_argument("--pipeline", default="1",
                   help="comma list of pipeline depths to time (serve.pipeline_depth): 1 runs each batch to "
                        "its answers before the next; N keeps N batches dispatched and not yet collected, as "
                        "the server's batcher does (rows 'pipeN'; latency = dispatch to answers, "
                        "throughput = requests / elapsed time). Returning users are timed at depth 1 only")
    p.add_argument("--naive-requests", type=int, default=20, help="timed requests of the naive engine per mode")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--exclude-history", action="store_true",
                   help="also time recommend / generative with every request excluding its history items "
                        "(rows 'recommend-excl', 'generative-excl'; the naive engine is not run for them)")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop timing a mode after this long")
    p.add_argument("--profile", default=None,
                   help="after the timings, trace --profile-iters recommend batches of --profile-batch with "
                        "jax.profiler under DIR and print device time per batch beside the wall time")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--profile-iters", type=int, default=10)
    p.add_argument("--json", default=None, help="write one JSON object per table row here")
    p.add_argument("--plot", default=None, help="PNG of latency vs throughput (needs matplotlib)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- setup


def build(args):
    """A model with random weights at the preset's shapes (speed does not need training),
    random unique semantic IDs when generative mode is benchmarked, and the two engines."""
    from genrec_jax.config import load_config, preset_path
    from genrec_jax.model.recommender import build_model
    from genrec_jax.serve.baseline import NaiveEngine
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.inputs import Catalog

    path = Path(args.config) if args.config else (preset_path("base") if (REPO / "configs/base.yaml").exists()
                                                   else preset_path("tiny"))
    modes = args.modes.split(",")
    buckets = [int(b) for b in args.batch_buckets.split(",")]
    overrides = list(args.overrides) + [
        f"data.max_seq_len={args.history_len}", "model.dropout=0.0",
        f"serve.batch_buckets={buckets}", f"serve.seq_buckets=[{args.history_len}]",
        f"serve.extend_buckets=[{max(4, args.new_events + 1)}]", f"serve.beam_width={args.beam}",
        f"serve.rank_micro_batch={args.rank_micro_batch}", f"serve.max_candidates={max(args.rank_candidates, 1)}",
        f"serve.max_k={max(args.k, args.beam)}", f"serve.param_dtype={args.param_dtype}",
        f"serve.prefix_cache_users={max(buckets) * 2}", "serve.cold_start_capacity=0",
        f"serve.max_history_len={args.history_len}",
    ]
    generative = "generative" in modes
    if generative:
        overrides.append("model.decoder.enabled=true")
    if "rank" in modes:
        overrides += ["model.tasks.enabled=true"]
    cfg = load_config(path, overrides)
    n_items = args.num_items or cfg.data.synthetic.num_items
    codes = sizes = None
    if generative:
        sizes = tuple(cfg.rqvae.codebook_sizes) + (max(8, cfg.rqvae.dedup_size),)
        rng = np.random.default_rng(0)
        space = int(np.prod(sizes, dtype=np.int64))
        if space < n_items:
            raise SystemExit(f"{n_items} items do not fit {space} semantic IDs; lower --num-items")
        if space < 10**8:
            flat = rng.choice(space, n_items, replace=False)
        else:  # too large to permute: draw with replacement until n_items distinct codes
            flat = np.unique(rng.integers(0, space, n_items + n_items // 4 + 16))
            while len(flat) < n_items:
                flat = np.unique(np.concatenate([flat, rng.integers(0, space, n_items)]))
            flat = rng.permutation(flat)[:n_items]
        codes = np.stack(np.unravel_index(flat, sizes), 1)
        codes = np.concatenate([np.zeros((1, len(sizes)), np.int64), codes]).astype(np.int32)
    model = build_model(cfg.model, num_items=n_items, num_actions=5, max_len=args.history_len, item_codes=codes,
                        code_sizes=sizes, action_names=("view", "like", "share", "skip", "purchase"))
    catalog = Catalog(["<pad>"] + [str(i) for i in range(1, n_items + 1)], model.action_names)
    t0 = time.perf_counter()
    engine = Engine(model, catalog, cfg.serve, model_version=f"bench-{path.stem}")
    compile_s = time.perf_counter() - t0
    naive = None if args.no_naive else NaiveEngine(model, beam_width=args.beam, rank_micro_batch=args.rank_micro_batch,
                                                   trie=engine.semantic.trie)
    return cfg, path, engine, naive, compile_s


def histories(n, length, num_items, seed):
    from genrec_jax.serve.inputs import History

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ts = np.cumsum(rng.integers(1, 3600, length)) + 1_700_000_000
        out.append(History(rng.integers(1, num_items + 1, length).astype(np.int32),
                           rng.integers(0, 5, length).astype(np.int32), ts.astype(np.int64), int(ts[-1]) + 5))
    return out


def encoder_flops(model, n: int) -> float:
    """Model FLOPs of one prefill of n tokens + retrieval over the catalogue (see docstring)."""
    layer = model.layers[0]
    d, h, dqk, dv = model.cfg.embed_dim, layer.num_heads, layer.attn_dim, layer.linear_dim
    per_token = 2 * d * h * (2 * dv + 2 * dqk) + 2 * h * dv * d
    pairs = n * (n + 1) / 2
    return len(model.layers) * (n * per_token + pairs * 2 * h * (dqk + dv)) + 2 * model.num_items * d


# --------------------------------------------------------------------------- timing


def percentiles(xs):
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def time_pipelined(engine, jobs_list, depth: int, max_seconds: float) -> tuple[list, float, int]:
    """Batches dispatched ``depth`` deep (the first two untimed): (latency of each timed
    batch, elapsed seconds from the first timed dispatch to the last answer, batches timed)."""
    import collections

    inflight = collections.deque()
    lat, t_first, t_last, timed = [], None, None, 0
    t_end = time.perf_counter() + max_seconds

    def finish():
        nonlocal t_last
        it, t0, handle = inflight.popleft()
        engine.collect(handle)
        t_last = time.perf_counter()
        if it >= 2:
            lat.append(t_last - t0)

    for it, jobs in enumerate(jobs_list):
        if len(inflight) == depth:
            finish()
        if it >= 2 and lat and time.perf_counter() > t_end:
            break
        t0 = time.perf_counter()
        if it == 2:
            while inflight:  # the timed part starts with an empty pipeline
                finish()
            t0 = t_first = time.perf_counter()
        inflight.append((it, t0, engine.dispatch(jobs)))
        timed += it >= 2
    while inflight:
        finish()
    return lat, t_last - t_first, timed


def make_jobs(engine, mode, b, args, seed, it):
    from genrec_jax.serve.engine import RankJob, RecommendJob

    rng = np.random.default_rng(seed * 7919 + it)
    hs = histories(b, args.history_len, engine.num_items, seed * 1000 + it)
    if mode == "rank":
        return [RankJob(h, rng.integers(1, engine.num_items + 1, args.rank_candidates).astype(np.int32)) for h in hs]
    if mode == "new-users":
        return [RecommendJob(h, args.k, user_id=f"new-{seed}-{it}-{i}") for i, h in enumerate(hs)]
    kind = "generative" if mode.startswith("generative") else "retrieval"
    return [RecommendJob(h, args.k, kind, np.unique(h.items) if mode.endswith("-excl") else np.zeros(0, np.int32))
            for h in hs]


def time_engine(engine, mode, b, args, seed):
    from genrec_jax.serve.engine import RankJob, RecommendJob

    n_items = engine.num_items
    L = args.history_len
    rng = np.random.default_rng(seed)
    cands = [rng.integers(1, n_items + 1, args.rank_candidates).astype(np.int32) for _ in range(b)]
    lat = []
    t_end = time.perf_counter() + args.max_seconds
    for it in range(args.iters + 2):  # 2 untimed warm batches
        if mode == "returning":
            # users first seen with L - new_events events (untimed), then with all L events
            full = histories(b, L, n_items, seed * 1000 + it)
            users = [f"u{seed}-{it}-{i}" for i in range(b)]
            from genrec_jax.serve.inputs import History

            first = [History(h.items[:-args.new_events], h.actions[:-args.new_events],
                             h.timestamps[:-args.new_events], int(h.timestamps[-args.new_events - 1]))
                     for h in full]
            engine.process([RecommendJob(h, args.k, user_id=u) for h, u in zip(first, users)])
            jobs = [RecommendJob(h, args.k, user_id=u) for h, u in zip(full, users)]
        else:
            hs = histories(b, L, n_items, seed * 1000 + it)
            if mode == "rank":
                jobs = [RankJob(h, c) for h, c in zip(hs, cands)]
            elif mode == "new-users":  # a fresh id each: encoded into the K/V pool, then retrieval
                jobs = [RecommendJob(h, args.k, user_id=f"new-{seed}-{it}-{i}") for i, h in enumerate(hs)]
            else:  # "<mode>-excl": each request also excludes its own history items
                kind = "generative" if mode.startswith("generative") else "retrieval"
                jobs = [RecommendJob(h, args.k, kind, np.unique(h.items) if mode.endswith("-excl") else
                                     np.zeros(0, np.int32)) for h in hs]
        t0 = time.perf_counter()
        engine.process(jobs)  # results are numpy: the device work is finished
        dt = time.perf_counter() - t0
        if it >= 2:
            lat.append(dt)
        if lat and time.perf_counter() > t_end:  # the time limit never leaves a mode without a sample
            break
    return lat


def profile_recommend(engine, args) -> list[dict]:
    """Wall time vs device time of retrieval ``recommend`` batches: how much of a batch's
    latency is host work (padding, transfers, result copies) rather than the model."""
    import jax

    from bench.common import print_trace_summary, summarize_trace
    from genrec_jax.serve.engine import RecommendJob

    b, n = args.profile_batch, args.profile_iters
    batches = [[RecommendJob(h, args.k, "retrieval") for h in histories(b, args.history_len, engine.num_items, 90 + i)]
               for i in range(n + 1)]
    engine.process(batches[0])  # warm
    engine.host_spans = {}  # host phases of the same batches, without the profiler
    for jobs in batches[1:]:
        engine.process(jobs)
    spans, engine.host_spans = engine.host_spans, None
    per = {k: 1e3 * v / spans["batches"] for k, v in spans.items() if k != "batches"}
    per["prepare"] = per["total"] - sum(per.get(k, 0.0) for k in ("dispatch", "wait", "fetch", "results"))
    print(f"host phases of recommend, batch {b} (ms per batch; 'wait' = until the device is done): "
          + ", ".join(f"{k} {per.get(k, 0.0):.2f}" for k in ("prepare", "dispatch", "wait", "fetch", "results", "total")))
    jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for jobs in batches[1:]:
        engine.process(jobs)
    wall_ms = (time.perf_counter() - t0) / n * 1e3
    jax.profiler.stop_trace()
    summary = summarize_trace(args.profile, steps=n)
    print_trace_summary(summary, f"profile of recommend, batch {b} ({n} batches; wall {wall_ms:.2f} ms per batch)")
    device_ms = sum(r["ms_per_step"] for r in summary if r["kind"] == "class")
    print(f"recommend batch {b}: wall {wall_ms:.2f} ms, device {device_ms:.2f} ms per batch "
          f"({100 * device_ms / wall_ms:.0f}% of the wall time on the device)")
    host = {"engine": "host phases", "mode": "recommend", "batch": b, **{f"{k}_ms": v for k, v in per.items()}}
    return [host] + [{"engine": "profile", "mode": "recommend", "batch": b, "wall_ms": wall_ms, "device_ms": device_ms,
                      **{k: v for k, v in r.items() if k != "ms_per_step"}, "ms_per_batch": r["ms_per_step"]}
                     for r in summary]


def time_naive(naive, mode, args, seed):
    hs = histories(args.naive_requests + 1, args.history_len, naive.model.num_items, seed)
    rng = np.random.default_rng(seed)
    lat = []
    t_end = time.perf_counter() + args.max_seconds
    for i, h in enumerate(hs):
        t0 = time.perf_counter()
        if mode == "rank":
            naive.rank(h, rng.integers(1, naive.model.num_items + 1, args.rank_candidates).astype(np.int32))
        else:
            naive.recommend(h, args.k, "generative" if mode == "generative" else "retrieval")
        if i > 0:  # the first call compiles (exact shapes, no ahead-of-time compile)
            lat.append(time.perf_counter() - t0)
        if lat and time.perf_counter() > t_end:  # at least one timed request, whatever the limit
            break
    return lat


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    cfg, path, engine, naive, compile_s = build(args)
    dev = jax.devices()[0]
    print(f"# serve_engine: preset {path.stem}, {engine.num_items} items, history {args.history_len}, k={args.k}, "
          f"beam {args.beam}, rank {args.rank_candidates} candidates, params {args.param_dtype}, "
          f"device {dev.platform}:{dev.device_kind}")
    print(f"# engine start-up: {engine.compiles} executables compiled in {compile_s:.1f}s "
          f"(K/V pool {engine.pool_bytes / 2**20:.1f} MiB)")
    flops = encoder_flops(engine._model, args.history_len)
    depths = [int(x) for x in args.pipeline.split(",")]
    if any(d < 1 for d in depths):
        raise SystemExit(f"--pipeline: depths must be >= 1, got {args.pipeline}")
    rows = []
    modes = [m for m in args.modes.split(",") if m != "generative" or engine.semantic.can_generate]
    if args.exclude_history:  # the same modes again, each request excluding its history items
        modes += [f"{m}-excl" for m in modes if m in ("recommend", "generative")]
    for mode in modes:
        best = 0.0
        for b in engine.batch_buckets:
            for depth in depths if mode != "returning" else [1]:
                if depth == 1:
                    lat = time_engine(engine, mode, b, args, seed=b)
                    thr = b / float(np.mean(lat))
                else:
                    jobs = [make_jobs(engine, mode, b, args, b, it) for it in range(args.iters + 2)]
                    lat, elapsed, n = time_pipelined(engine, jobs, depth, args.max_seconds)
                    thr = b * n / elapsed
                p50, p99 = percentiles(lat)
                best = max(best, thr)
                row = {"engine": "optimised" if depth == 1 else f"pipe{depth}", "mode": mode, "batch": b,
                       "requests_per_s": thr, "p50_ms": p50, "p99_ms": p99, "batches": len(lat),
                       "pipeline_depth": depth}
                if mode in ("recommend", "returning"):
                    row["model_tflops"] = thr * flops / 1e12 if mode == "recommend" else None
                rows.append(row)
                print_row(row)
        if naive is not None and not mode.endswith("-excl"):  # returning users: the naive engine has no cache, it re-encodes everything
            lat = time_naive(naive, mode, args, seed=7)
            p50, p99 = percentiles(lat)
            thr = 1.0 / float(np.mean(lat))
            row = {"engine": "naive", "mode": mode, "batch": 1, "requests_per_s": thr, "p50_ms": p50, "p99_ms": p99,
                   "batches": len(lat), "speedup": best / thr}
            rows.append(row)
            print_row(row)
    print(f"# prefix cache: {engine.prefix.hits} hits, {engine.prefix.misses} misses")
    if args.profile:
        rows += profile_recommend(engine, args)
    for mode in modes:
        sp = [r["speedup"] for r in rows if r["mode"] == mode and r.get("speedup")]
        if sp:
            print(f"speed-up {mode}: {sp[0]:.1f}x (best optimised throughput / naive)")
    write_rows(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


HEADER = f"{'engine':<10}{'mode':<16}{'batch':>6}{'req/s':>11}{'p50 ms':>10}{'p99 ms':>10}{'speed-up':>10}"


def print_row(row):
    if not getattr(print_row, "done", False):
        print(HEADER)
        print("-" * len(HEADER))
        print_row.done = True
    sp = f"{row['speedup']:.1f}x" if row.get("speedup") else ""
    print(f"{row['engine']:<10}{row['mode']:<16}{row['batch']:>6}{row['requests_per_s']:>11.1f}"
          f"{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}{sp:>10}", flush=True)


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [r for r in rows if r["mode"] == mode and r["engine"] == "optimised"]
        ax.plot([r["requests_per_s"] for r in pts], [r["p99_ms"] for r in pts], "o-", label=f"{mode} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("p99 batch latency (ms)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


if __name__ == "__main__":
    sys.exit(main())

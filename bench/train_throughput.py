"""Training throughput: tokens/s, step time, peak memory and MFU of the jit'ed train step.

    python bench/train_throughput.py [--config configs/base.yaml] [--set key=value ...]
        [--attention xla,triton] [--scaling] [--steps 20] [--profile DIR] [--json rows.jsonl]

Step time and tokens/s are the steady state of a training run: ``--steps`` steps dispatched
back to back (the host enqueues a step while the device runs the one before, as ``train.py``
does) and one wait at the end. ``blocked ms`` is the median of the same steps timed one at a
time, each waited for (host dispatch plus device time; the profile covers these).

MFU = (model FLOPs per token of a train step x tokens/s) / peak, where FLOPs per token are
counted from the config (genrec_jax.planning.flops_per_token, x3 for forward + backward)
and the peak is *measured* here: the best of a few large bf16 matrix products on the
device (override with --peak-tflops). Tokens are valid (non-padding) tokens; batches are
full-length so every step does the same work.

--attention xla,triton times the same step with each attention backend and prints the
ratio; --scaling also times the step on all devices, once per layout in --layouts (``data``:
plain data parallel; ``fsdp``: data parallel with parameters and optimizer state sharded),
and prints the per-device efficiency = (tokens/s on N devices / N) / tokens/s on one. The
scaling is weak: each device keeps the config's batch (the global batch is N x batch_size),
which is how a job grows onto more GPUs; --strong keeps the global batch instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import print_trace_summary, summarize_trace, write_rows  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from genrec_jax.config import MeshConfig, load_config, preset_path  # noqa: E402
from genrec_jax.planning import flops_per_token  # noqa: E402
from genrec_jax.sharding import parse_mesh_arg  # noqa: E402


def measure_peak_tflops(dtype=jnp.bfloat16, n: int = 8192, reps: int = 10) -> float:
    """Best achieved matmul rate (TFLOP/s) on the default device, random operands."""
    if jax.devices()[0].platform == "cpu":
        n = 1024
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def synthetic_batch(b: int, n: int, num_items: int, rng) -> dict[str, np.ndarray]:
    ts = np.cumsum(rng.integers(1, 3600, (b, n)), axis=1).astype(np.int32)
    return {
        "items": rng.integers(1, num_items + 1, (b, n)).astype(np.int32),
        "actions": rng.integers(0, 5, (b, n)).astype(np.int32),
        "timestamps": ts,
        "query_timestamps": np.concatenate([ts[:, 1:], ts[:, -1:] + 60], 1).astype(np.int32),
        "targets": rng.integers(1, num_items + 1, (b, n)).astype(np.int32),
        "target_actions": rng.integers(0, 5, (b, n)).astype(np.int32),
        "target_watch": rng.random((b, n)).astype(np.float32),
        "lengths": np.full(b, n, np.int32),
    }


def time_config(cfg, devices, steps: int, warmup: int, profile: str | None = None) -> dict:
    from genrec_jax.model.recommender import build_model
    from genrec_jax.sharding import make_mesh
    from genrec_jax.train.step import StepBuilder

    mesh = make_mesh(cfg.mesh, devices)
    num_items = cfg.data.synthetic.num_items
    model = build_model(cfg.model, num_items=num_items, num_actions=5, max_len=cfg.data.max_seq_len, seed=0,
                        action_names=("view", "like", "share", "skip", "purchase"))
    steps_b = StepBuilder(model, cfg.train, mesh, item_counts=np.ones(num_items + 1))
    state = steps_b.init_state()
    rng = np.random.default_rng(0)
    b, n = cfg.data.batch_size, cfg.data.max_seq_len
    batches = [steps_b.device_batch(synthetic_batch(b, n, num_items, rng)) for _ in range(3)]
    t0 = time.perf_counter()
    state, m = steps_b.train_step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    first_loss = float(m["loss"])  # same init and batch on every layout (with --strong): compare across rows
    for i in range(warmup):
        state, m = steps_b.train_step(state, batches[i % 3])
    jax.block_until_ready(m)
    if profile:
        jax.profiler.start_trace(profile, create_perfetto_trace=True)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = steps_b.train_step(state, batches[i % 3])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    if profile:
        jax.profiler.stop_trace()
    # Steady state, as train.py runs: steps dispatched back to back (the host enqueues the
    # next step while the device runs this one), one wait at the end.
    t = time.perf_counter()
    for i in range(steps):
        state, m = steps_b.train_step(state, batches[i % 3])
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t) / steps
    loss = float(m["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} while timing")
    peak_mem = None
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats:
        peak_mem = stats.get("peak_bytes_in_use")
    return {"step_ms": step_s * 1e3, "step_ms_blocked": statistics.median(times) * 1e3,
            "tokens_per_s": b * n / step_s, "compile_s": compile_s, "first_loss": first_loss,
            "peak_mem_gib": None if peak_mem is None else peak_mem / 2**30, "devices": len(devices)}


def layout_mesh(name: str, n: int) -> MeshConfig:
    """'data' / 'fsdp' (all n devices on that axis) or 'axis=size+axis=size'."""
    if name in ("data", "fsdp"):
        return MeshConfig(**{"data": 1, name: n})
    sizes = dict(data=1, fsdp=1, tensor=1, expert=1)
    sizes.update(parse_mesh_arg(name.replace("+", ",")))
    return MeshConfig(**sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(preset_path("base")))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--attention", default="xla", help="comma list of backends to time: xla,triton")
    p.add_argument("--scaling", action="store_true", help="also time the step on all devices (see --layouts)")
    p.add_argument("--layouts", default="data,fsdp",
                   help="comma list of multi-device layouts for --scaling: data, fsdp, or axis=size pairs "
                        "joined by '+' (e.g. data=2+expert=2)")
    p.add_argument("--no-single", action="store_true",
                   help="with --scaling: skip the one-device baseline (e.g. when comparing XLA/NCCL flags)")
    p.add_argument("--strong", action="store_true",
                   help="--scaling keeps the global batch (default: batch_size per device)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul measurement")
    p.add_argument("--profile", default=None,
                   help="write a jax.profiler trace of the timed steps under DIR/<backend>-<n>dev and print "
                        "where the device time goes (kernel classes and the top kernels)")
    p.add_argument("--profile-top", type=int, default=25, help="kernels listed by --profile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    devices = jax.devices()
    peak = args.peak_tflops or measure_peak_tflops()
    rows, profile_rows = [], []
    for backend in args.attention.split(","):
        cfg = load_config(args.config, [*args.overrides, f"model.attention_backend={backend}"])
        fpt = 3 * flops_per_token(cfg, cfg.data.synthetic.num_items)
        layouts = [] if args.no_single else [("single", [devices[0]], MeshConfig(data=1))]
        if args.scaling and len(devices) > 1:
            layouts += [(name, devices, layout_mesh(name, len(devices))) for name in args.layouts.split(",")]
        per_device_batch = cfg.data.batch_size
        for name, devs, mesh_cfg in layouts:
            cfg.mesh = mesh_cfg
            cfg.data.batch_size = per_device_batch * (1 if args.strong else len(devs))
            prof = None if not args.profile else str(Path(args.profile) / f"{backend}-{name}-{len(devs)}dev")
            try:
                r = time_config(cfg, devs, args.steps, args.warmup, prof)
            except RuntimeError as e:  # e.g. triton requested without a GPU
                print(f"{backend}: {e}")
                continue
            r.update(layout=name, mesh=",".join(f"{k}={v}" for k, v in vars(mesh_cfg).items() if v != 1),
                     global_batch=cfg.data.batch_size)
            r.update(backend=backend, config=Path(args.config).stem, device=devices[0].device_kind,
                     flops_per_token=fpt, peak_tflops_measured=peak,
                     mfu=fpt * r["tokens_per_s"] / (peak * 1e12 * r["devices"]))
            rows.append(r)
            if prof:
                summary = summarize_trace(prof, args.steps, top=args.profile_top)
                print_trace_summary(summary, f"profile of {backend} on {len(devs)} device(s), {prof}")
                profile_rows += [{"bench": "profile", "backend": backend, "devices": len(devs), **x} for x in summary]
    if not rows:
        return 1
    head = (f"{'backend':<8}{'layout':<16}{'devices':>8}{'batch':>7}{'step ms':>10}{'blocked ms':>11}"
            f"{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'compile s':>10}")
    print(f"\n{rows[0]['config']} on {rows[0]['device']} (measured matmul peak {peak:.1f} TFLOP/s, "
          f"{rows[0]['flops_per_token'] / 1e9:.3f} GFLOP per token per train step)")
    print(head)
    for r in rows:
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['backend']:<8}{r['mesh'] or 'one device':<16}{r['devices']:>8}{r['global_batch']:>7}"
              f"{r['step_ms']:>10.1f}{r['step_ms_blocked']:>11.1f}{r['tokens_per_s']:>12.0f}"
              f"{100 * r['mfu']:>7.1f}%{mem:>10}{r['compile_s']:>10.1f}")
    one = {r["backend"]: r for r in rows if r["devices"] == 1}
    if "xla" in one and "triton" in one:
        print(f"triton / xla tokens/s: {one['triton']['tokens_per_s'] / one['xla']['tokens_per_s']:.2f}x")
    for r in rows:
        if r["devices"] > 1 and r["backend"] in one:
            eff = r["tokens_per_s"] / r["devices"] / one[r["backend"]]["tokens_per_s"]
            r["scaling_efficiency"] = eff
            print(f"{r['backend']}: {r['devices']} devices, {r['mesh']}, per-device efficiency {100 * eff:.1f}%")
    write_rows(args.json, rows + profile_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

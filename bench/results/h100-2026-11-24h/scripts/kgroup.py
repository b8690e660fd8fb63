"""Kernels with the launch order re-read block-fastest ("grouped", the tree) against the
previous order ("plain", .devscripts/hstu_e.py), alternating in one process."""
import importlib.util, json, math, sys
sys.path.insert(0, ".")
import numpy as np
import jax, jax.numpy as jnp
from bench.kernels import bench
import genrec_jax.kernels.hstu_attention as grouped

spec = importlib.util.spec_from_file_location("hstu_plain", ".devscripts/hstu_e.py")
plain = importlib.util.module_from_spec(spec); sys.modules["hstu_plain"] = plain; spec.loader.exec_module(plain)
MODS = {"plain": plain, "grouped": grouped}
only = sys.argv[1] if len(sys.argv) > 1 else "all"


def inputs(b, n, h, d, seed):
    rng = np.random.default_rng(n + b)
    lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
    sets = []
    for s in range(3):
        kq, kk, kv, kt = jax.random.split(jax.random.PRNGKey(seed + s), 4)
        q = jax.random.normal(kq, (b, n, h, d), jnp.bfloat16); k = jax.random.normal(kk, (b, n, h, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, n, h, d), jnp.bfloat16); cot = jax.random.normal(kt, (b, n, h, d), jnp.bfloat16)
        ts = jnp.cumsum(jax.random.randint(kt, (b, n), 0, 5000), axis=1).astype(jnp.int32)
        qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)
        sets.append((q, k, v, jnp.asarray(lengths), jax.random.normal(kq, (n + 1,), jnp.float32) * 0.1,
                     jax.random.normal(kk, (64,), jnp.float32) * 0.1, ts, qts, cot))
    return sets, float(np.sum(lengths.astype(np.float64) ** 2) / 2)


def run(label, b, n, h, d, rab, kw, passes=("fwd", "fwd+bwd"), rounds=2):
    import os
    if os.environ.get("KG_TINY"):
        b, n, h, d = 2, min(n, 96), 1, min(d, 32)
    sets, pairs = inputs(b, n, h, d, 7)
    ref = {}
    for _ in range(rounds):
        for name, mod in MODS.items():
            def call(q, k, v, l, pb, tb, ts, qts, mod=mod):
                extra = dict(pos_bias=pb, time_bias=tb, timestamps=ts, query_timestamps=qts) if rab else {}
                return mod.hstu_attention_triton(q, k, v, l, alpha=1 / math.sqrt(d), max_len=n, **extra, **kw)

            def fb(q, k, v, l, pb, tb, ts, qts, cot, call=call):
                out, vjp = jax.vjp(lambda q_, k_, v_, pb_, tb_: call(q_, k_, v_, l, pb_, tb_, ts, qts), q, k, v, pb, tb)
                return out, vjp(cot)

            for what in passes:
                fn = call if what == "fwd" else fb
                args = [s[:8] for s in sets] if what == "fwd" else sets
                try:
                    med, lo, hi = bench(fn, args, rounds=7)
                    o = jax.jit(fn)(*args[0])
                    flat = [np.asarray(x.astype(jnp.float32)) for x in jax.tree.leaves(o)]
                    key = (what,)
                    if key not in ref:
                        ref[key] = flat
                    diff = max(float(np.max(np.abs(a - r))) for a, r in zip(flat, ref[key]))
                    mult = 1.0 if what == "fwd" else 3.5
                    r = dict(case=label, order=name, what=what, ms=med * 1e3, lo=lo * 1e3, hi=hi * 1e3,
                             tflops=mult * 4 * h * d * pairs / med / 1e12, max_abs_diff_vs_first=diff,
                             finite=all(np.isfinite(a).all() for a in flat))
                except Exception as ex:  # noqa: BLE001
                    r = dict(case=label, order=name, what=what, error=f"{type(ex).__name__}: {str(ex)[:160]}")
                print(json.dumps(r), flush=True)


F0 = dict(BLOCK_M=64, BLOCK_N=32, EARLY_S=0, num_warps=4, num_stages=3)
F1 = dict(F0, EARLY_S=1)
BW = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)
DQ = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)
if only in ("all", "long"):
    for n in (4096, 8192):
        run(f"N{n} E0 sep", 32, n, 4, 128, False, dict(fwd_config=F0, bwd_config=BW, dq_config=DQ, dq_mode="separate"))
        run(f"N{n} E1", 32, n, 4, 128, False, dict(fwd_config=F1), passes=("fwd",))
        run(f"N{n} atomic", 32, n, 4, 128, False, dict(fwd_config=F0, bwd_config=BW, dq_mode="atomic"), passes=("fwd+bwd",), rounds=1)
if only in ("all", "short"):
    for n in (1024, 256):
        run(f"N{n} E0 sep", 32, n, 4, 128, False, dict(fwd_config=F0, bwd_config=BW, dq_config=DQ, dq_mode="separate"))
    # the base training shape: head dim 64, N=512, position + time bias, first configurations, atomic dQ
    run("train B64 N512 H8 D64 pos+time", 64, 512, 8, 64, True, {})

"""Forward: base vs "pp" (next block's S issued before this block's SiLU/AV), same run, several configs."""
import sys, math, json
sys.path.insert(0, "bench/results/h100-2026-11-24c/scripts"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
import variants
from bench.kernels import bench

mods = {v: variants.load(v) for v in ("base", "pp")}
for n in (4096, 8192, 1024):
    b, h, d = 32, 4, 128
    rng = np.random.default_rng(n)
    lengths = rng.integers(n // 2, n + 1, b).astype(np.int32); lengths[0] = n
    sets = []
    for s in range(3):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(s), 3)
        sets.append((jax.random.normal(kq, (b, n, h, d), jnp.bfloat16), jax.random.normal(kk, (b, n, h, d), jnp.bfloat16),
                     jax.random.normal(kv, (b, n, h, d), jnp.bfloat16), jnp.asarray(lengths)))
    pairs = float(np.sum(lengths.astype(np.float64) ** 2) / 2)
    for cfg in [(64, 32, 4, 3), (64, 32, 4, 4), (128, 64, 4, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)]:
        c = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
        outs = {}
        for var in ("base", "pp", "base2"):
            ka = mods[var.rstrip("2")]
            fn = lambda q, k, v, l, ka=ka, c=c: ka.hstu_attention_triton(q, k, v, l, alpha=1 / math.sqrt(d), max_len=n, fwd_config=c)
            try:
                med, lo, hi = bench(fn, sets, rounds=9)
                outs[var] = jax.jit(fn)(*sets[0])
                err = float(jnp.max(jnp.abs(outs[var].astype(jnp.float32) - outs["base"].astype(jnp.float32))))
                r = dict(N=n, variant=var, cfg=c, ms=med * 1e3, lo=lo * 1e3, hi=hi * 1e3, tflops=4 * h * d * pairs / med / 1e12, max_abs_diff_vs_base=err)
            except Exception as e:
                r = dict(N=n, variant=var, cfg=c, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(r), flush=True)

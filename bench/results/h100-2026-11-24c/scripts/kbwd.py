"""Backward variants with the bias, fwd+bwd time and gradient agreement with the committed kernel."""
import sys, math, json
sys.path.insert(0, "bench/results/h100-2026-11-24c/scripts"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
import variants
from bench.kernels import bench

def shape_sets(b, n, h, d):
    rng = np.random.default_rng(n)
    lengths = rng.integers(n // 2, n + 1, b).astype(np.int32); lengths[0] = n
    sets = []
    for s in range(3):
        kq, kk, kv, kt = jax.random.split(jax.random.PRNGKey(s), 4)
        q = jax.random.normal(kq, (b, n, h, d), jnp.bfloat16); k = jax.random.normal(kk, (b, n, h, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, n, h, d), jnp.bfloat16)
        ts = jnp.cumsum(jax.random.randint(kt, (b, n), 0, 5000), axis=1).astype(jnp.int32)
        qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)
        sets.append((q, k, v, jnp.asarray(lengths), jax.random.normal(kq, (n + 1,), jnp.float32) * 0.1,
                     jax.random.normal(kk, (64,), jnp.float32) * 0.1, ts, qts, jax.random.normal(kt, (b, n, h, d), jnp.bfloat16)))
    return sets

for (b, n, h, d) in ((64, 512, 8, 64), (32, 4096, 4, 128)):
    sets = shape_sets(b, n, h, d)
    ref = None
    for var in ("base", "hist_rows", "no_hist", "no_posgrad"):
        ka = variants.load(var)
        for bcfg in ka.bwd_configs(d, True)[:2]:
            cfg = dict(bcfg.kwargs, num_warps=bcfg.num_warps, num_stages=bcfg.num_stages)
            def fb(q, k, v, lengths, pb, tb, ts, qts, cot, ka=ka, cfg=cfg):
                def f(q_, k_, v_, pb_, tb_):
                    return ka.hstu_attention_triton(q_, k_, v_, lengths, alpha=1 / math.sqrt(d), max_len=n, pos_bias=pb_, time_bias=tb_,
                                                    timestamps=ts, query_timestamps=qts, bwd_config=cfg)
                out, vjp = jax.vjp(f, q, k, v, pb, tb)
                return out, vjp(cot)
            try:
                med, lo, hi = bench(fb, sets, rounds=7)
                g = jax.jit(fb)(*sets[0])[1]
                if ref is None: ref = g
                err = {nm: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))) / (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1e-30))
                       for nm, a, r in zip(("dq", "dk", "dv", "dpos", "dtime"), g, ref)}
                r = dict(N=n, D=d, variant=var, cfg=cfg, ms=med * 1e3, rel_err_vs_base=err)
            except Exception as e:
                r = dict(N=n, D=d, variant=var, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(r), flush=True)

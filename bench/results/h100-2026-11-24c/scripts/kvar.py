"""Kernel variant diagnostics on the GPU: forward time of source variants at two shapes."""
import sys, math, json
sys.path.insert(0, "bench/results/h100-2026-11-24c/scripts"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
import variants
from bench.kernels import bench

out_path = sys.argv[1]
rows = []
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
                     jax.random.normal(kk, (64,), jnp.float32) * 0.1, ts, qts))
    return sets, float(np.sum(lengths.astype(np.float64) ** 2) / 2)

for (b, n, h, d) in ((32, 4096, 4, 128), (64, 512, 8, 64)):
    sets, pairs = shape_sets(b, n, h, d)
    for var in ("base", "pp", "nogather"):
        ka = variants.load(var)
        for rab in ("none", "pos", "time", "pos+time"):
            if var == "pp" and rab != "none":
                continue
            if var == "nogather" and rab == "none":
                continue
            cands = [c for c in ka.fwd_configs(d, rab != "none")]
            cands = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cands]
            for cfg in cands:
                def call(q, k, v, lengths, pb, tb, ts, qts, cfg=cfg, rab=rab, ka=ka):
                    kw = dict(alpha=1 / math.sqrt(d), max_len=n, norm="max_len", fwd_config=cfg)
                    if "pos" in rab: kw["pos_bias"] = pb
                    if "time" in rab: kw.update(time_bias=tb, timestamps=ts, query_timestamps=qts)
                    return ka.hstu_attention_triton(q, k, v, lengths, **kw)
                try:
                    med, lo, hi = bench(call, sets, rounds=7)
                    r = dict(B=b, N=n, H=h, D=d, variant=var, rab=rab, cfg=cfg, ms=med * 1e3,
                             tflops=4 * h * d * pairs / med / 1e12)
                except Exception as e:
                    r = dict(B=b, N=n, H=h, D=d, variant=var, rab=rab, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(r); print(json.dumps(r), flush=True)
            # correctness of the variant vs base (first config) for rab none / pos+time
with open(out_path, "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")

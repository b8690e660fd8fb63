"""Forward with and without EARLY_S, alternating in one process (no bias, B=32 H=4 D=128)."""
import json, math, sys
sys.path.insert(0, ".")
import numpy as np
import jax, jax.numpy as jnp
from bench.kernels import bench
from genrec_jax.kernels.hstu_attention import hstu_attention_triton

out_rows = []
for n in (4096, 8192, 1024, 256):
    b, h, d = 32, 4, 128
    rng = np.random.default_rng(n)
    lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
    sets = []
    for s in range(3):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(s), 3)
        sets.append((jax.random.normal(kq, (b, n, h, d), jnp.bfloat16), jax.random.normal(kk, (b, n, h, d), jnp.bfloat16),
                     jax.random.normal(kv, (b, n, h, d), jnp.bfloat16), jnp.asarray(lengths)))
    pairs = float(np.sum(lengths.astype(np.float64) ** 2) / 2)
    cfgs = [(64, 32, 4, 3, 0), (64, 32, 4, 3, 1)] * 3 + [(128, 64, 4, 2, 0), (128, 64, 4, 2, 1), (64, 32, 4, 4, 1), (128, 64, 8, 3, 1)]
    ref = None
    for bm, bn, w, st, e in cfgs:
        c = dict(BLOCK_M=bm, BLOCK_N=bn, EARLY_S=e, num_warps=w, num_stages=st)
        fn = lambda q, k, v, l, c=c: hstu_attention_triton(q, k, v, l, alpha=1 / math.sqrt(d), max_len=n, fwd_config=c)
        try:
            med, lo, hi = bench(fn, sets, rounds=9)
            o = np.asarray(jax.jit(fn)(*sets[0]).astype(jnp.float32))
            if ref is None:
                ref = o
            r = dict(N=n, cfg=f"M{bm} N{bn} w{w} s{st} E{e}", ms=med * 1e3, lo=lo * 1e3, hi=hi * 1e3,
                     tflops=4 * h * d * pairs / med / 1e12, max_abs_diff_vs_first=float(np.max(np.abs(o - ref))),
                     finite=bool(np.isfinite(o).all()))
        except Exception as ex:  # noqa: BLE001
            r = dict(N=n, cfg=f"M{bm} N{bn} w{w} s{st} E{e}", error=f"{type(ex).__name__}: {str(ex)[:160]}")
        print(json.dumps(r), flush=True)
        out_rows.append(r)

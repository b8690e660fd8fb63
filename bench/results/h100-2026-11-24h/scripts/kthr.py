"""Launch order around GROUP_MIN_LEN: plain vs grouped at N = 1536, 2048, 3072 (B=32 H=4 D=128,
no bias, first configurations), alternating in one process."""
import json, math, sys
sys.path.insert(0, ".")
import numpy as np
import jax, jax.numpy as jnp
from bench.kernels import bench
import genrec_jax.kernels.hstu_attention as ka

for n in (1536, 2048, 3072):
    b, h, d = 32, 4, 128
    rng = np.random.default_rng(n)
    lengths = jnp.asarray(rng.integers(n // 2, n + 1, b).astype(np.int32))
    sets = []
    for s in range(3):
        kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(s), 4)
        sets.append(tuple(jax.random.normal(x, (b, n, h, d), jnp.bfloat16) for x in (kq, kk, kv, kc)) + (lengths,))
    pairs = float(np.sum(np.asarray(lengths, np.float64) ** 2) / 2)
    call = lambda q, k, v, l: ka.hstu_attention_triton(q, k, v, l, alpha=1 / math.sqrt(d), max_len=n, dq_mode="separate")

    def fb(q, k, v, c, l):
        out, vjp = jax.vjp(lambda a, b_, c_: call(a, b_, c_, l), q, k, v)
        return out, vjp(c)

    for rnd in range(2):
        for order, thr in (("plain", 1 << 30), ("grouped", 1)):
            ka.GROUP_MIN_LEN = thr
            for what, fn, args in (("fwd", lambda q, k, v, c, l: call(q, k, v, l), sets), ("fwd+bwd", fb, sets)):
                med, lo, hi = bench(fn, args, rounds=7)
                print(json.dumps(dict(N=n, order=order, what=what, round=rnd, ms=med * 1e3, lo=lo * 1e3, hi=hi * 1e3,
                                      tflops=(1 if what == "fwd" else 3.5) * 4 * h * d * pairs / med / 1e12)), flush=True)

"""XLA attention forward+backward at the base training shape, for the tree in place (old or new)."""
import sys, time, json
import numpy as np, jax, jax.numpy as jnp
from genrec_jax.ops import hstu_attention as ops

tag = sys.argv[1]
rows = []
for (b, n, h, d, qb) in [(64, 512, 8, 64, 128), (64, 512, 8, 64, 0), (16, 1024, 8, 64, 128), (32, 512, 8, 128, 128)]:
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(4))
    lengths = jnp.asarray(rng.integers(n // 2, n + 1, b).astype(np.int32))
    ts = jnp.asarray(np.cumsum(rng.integers(0, 5000, (b, n)), axis=1).astype(np.int32))
    qts = ts + 7
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32)) * 0.1
    tb = jnp.asarray(rng.standard_normal(64).astype(np.float32)) * 0.1

    def loss(q, k, v, pos, tb):
        out = ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, time_bias=tb, timestamps=ts,
                                 query_timestamps=qts, backend="xla", query_block=qb)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    fw = jax.jit(loss)
    res = {}
    for name, f in (("fwd", fw), ("fwd+bwd", fb)):
        jax.block_until_ready(f(q, k, v, pos, tb))
        ts_ = []
        for _ in range(30):
            t = time.perf_counter(); jax.block_until_ready(f(q, k, v, pos, tb)); ts_.append(time.perf_counter() - t)
        res[name] = float(np.median(ts_) * 1e3)
    row = dict(code=tag, B=b, N=n, H=h, D=d, query_block=qb, fwd_ms=res["fwd"], fwd_bwd_ms=res["fwd+bwd"])
    print(json.dumps(row), flush=True)
    rows.append(row)

import time, math
import jax, jax.numpy as jnp, numpy as np
from genrec_jax.ops.hstu_attention import hstu_attention_reference as ref, hstu_attention_blocked as blk
b, n, h, d = 4, 512, 4, 32
rng = np.random.default_rng(0)
f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
q, k, v = f(b, n, h, d), f(b, n, h, d), f(b, n, h, d)
lengths = jnp.full((b,), n)
ts = jnp.cumsum(jnp.asarray(rng.integers(0, 5000, (b, n))), axis=1).astype(jnp.int32)
qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)
pb, tb = f(n + 1), f(64)
def mk(fn):
    def loss(q, k, v, pb, tb):
        return jnp.sum(fn(q, k, v, lengths, alpha=0.1, max_len=n, pos_bias=pb, time_bias=tb, timestamps=ts, query_timestamps=qts) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
for name, fn in [("ref", ref), ("blk128", lambda *a, **k: blk(*a, block=128, **k)), ("ref", ref), ("blk64", lambda *a, **k: blk(*a, block=64, **k))]:
    g = mk(fn); jax.block_until_ready(g(q, k, v, pb, tb))
    t = time.perf_counter()
    for _ in range(3): jax.block_until_ready(g(q, k, v, pb, tb))
    print(name, (time.perf_counter() - t) / 3 * 1e3, "ms")

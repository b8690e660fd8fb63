"""Device-time breakdown of the XLA attention's forward+backward at the base training shape."""
import sys, json, shutil
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "bench")
from common import summarize_trace
from genrec_jax.ops import hstu_attention as ops
b, n, h, d, qb = 64, 512, 8, 64, 128
rng = np.random.default_rng(0)
q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(4))
lengths = jnp.asarray(rng.integers(n // 2, n + 1, b).astype(np.int32))
ts = jnp.asarray(np.cumsum(rng.integers(0, 5000, (b, n)), axis=1).astype(np.int32))
pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32)) * 0.1
tb = jnp.asarray(rng.standard_normal(64).astype(np.float32)) * 0.1
def loss(q, k, v, pos, tb):
    out = ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, time_bias=tb, timestamps=ts,
                             query_timestamps=ts + 7, backend="xla", query_block=qb)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))
f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
for _ in range(3):
    jax.block_until_ready(f(q, k, v, pos, tb))
shutil.rmtree("/tmp/aprof", ignore_errors=True)
jax.profiler.start_trace("/tmp/aprof", create_perfetto_trace=True)
for _ in range(10):
    jax.block_until_ready(f(q, k, v, pos, tb))
jax.profiler.stop_trace()
for r in summarize_trace("/tmp/aprof", 10, top=30):
    print(json.dumps(dict(bench="profile", **r)))

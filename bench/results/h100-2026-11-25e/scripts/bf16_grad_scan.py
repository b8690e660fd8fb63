"""bfloat16 gradients of the blocked XLA attention against float32 on the same rounded inputs,
60 random cases; run from the repository root (with PYTHONPATH=<other tree> for another code state)."""
import numpy as np, jax, jax.numpy as jnp, sys
sys.path.insert(0,'tests/ops')
from test_hstu_attention import random_inputs
from genrec_jax.ops import hstu_attention as ops
worst=[]
grads={}
R=np.random.default_rng(123)
for it in range(60):
    n=int(R.integers(2,41)); block=int(R.integers(1,17)); wt=bool(R.integers(0,2)); seed=int(R.integers(0,10000))
    rng = np.random.default_rng(seed)
    b, h, d = 2, 2, 16
    q, k, v, ts, qts = (jnp.asarray(x) for x in random_inputs(rng, b, n, h, d, d))
    lengths = jnp.asarray([n, int(rng.integers(1, n + 1))], jnp.int32)
    nt = jnp.asarray([min(2, n), 0], jnp.int32) if wt else None
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32))
    tb = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32))
    def loss(q, k, v, pos, tb, qb):
        out = ops.hstu_attention(q, k, v, lengths, max_len=n, norm="causal_count", num_targets=nt, pos_bias=pos,
                                 time_bias=tb, timestamps=ts, query_timestamps=qts, backend="xla", query_block=qb)
        return jnp.sum(out.astype(jnp.float32) * w)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5,))
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    want = grad(*(x.astype(jnp.float32) for x in bf), pos, tb, 0)
    got = grad(*bf, pos, tb, block)
    e=[float(np.max(np.abs(np.asarray(c.astype(jnp.float32),np.float64)-np.asarray(a,np.float64)))/(np.max(np.abs(np.asarray(a)))+1e-30)) for a,c in zip(want,got)]
    worst.append((max(e), n, block, wt, seed, [round(x,4) for x in e]))
E=np.array([w_[5] for w_ in worst]); print("median per tensor", np.round(np.median(E,0),4), "p90", np.round(np.quantile(E,0.9,axis=0),4), "max", np.round(E.max(0),4)); import genrec_jax; print(genrec_jax.__file__)
worst.sort(reverse=True)
for w_ in worst[:6]: print(w_)
print("median", np.median([w_[0] for w_ in worst]))

"""Group LayerNorm picks each token type's own parameters."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.model.group_norm import GroupLayerNorm
from genrec_jax.model.layers import layer_norm


def test_each_token_type_uses_its_own_scale_and_bias():
    gln = GroupLayerNorm(6, rngs=nnx.Rngs(0), num_types=4)
    scale = np.arange(24, dtype=np.float32).reshape(4, 6) / 10 + 0.5
    bias = -np.arange(24, dtype=np.float32).reshape(4, 6) / 7
    gln.scale[...] = jnp.asarray(scale)
    gln.bias[...] = jnp.asarray(bias)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    types = np.array([[0, 1, 2, 3, 1], [3, 3, 0, 2, 1]], np.int32)
    y = np.asarray(gln(jnp.asarray(x), jnp.asarray(types)))
    normed = np.asarray(layer_norm(jnp.asarray(x)))
    for b in range(2):
        for t in range(5):
            want = normed[b, t] * scale[types[b, t]] + bias[types[b, t]]
            np.testing.assert_allclose(y[b, t], want, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_only_the_types_present():
    import jax

    gln = GroupLayerNorm(4, rngs=nnx.Rngs(0), num_types=4)
    gd, p = nnx.split(gln, nnx.Param)
    x = jnp.ones((1, 3, 4)) * jnp.arange(4.0)
    types = jnp.array([[1, 1, 3]])
    g = jax.grad(lambda p: jnp.sum(nnx.merge(gd, p)(x, types) ** 2))(p)
    gs = np.abs(np.asarray(g["scale"][...])).sum(-1)
    assert gs[0] == 0 and gs[2] == 0 and gs[1] > 0 and gs[3] > 0

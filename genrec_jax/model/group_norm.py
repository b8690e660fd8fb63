"""Group LayerNorm (MTGR): one (scale, bias) pair per token type.

    y = LN(x) * scale[type] + bias[type]

The per-type parameters are rows of a [num_types, D] table gathered by each token's type,
so a batch of mixed user / event / item / context tokens is normalised in one pass, with
no Python loop over types inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.data.types import NUM_TOKEN_TYPES, TOKEN_EVENT
from genrec_jax.model.layers import layer_norm, param


class GroupLayerNorm(nnx.Module):
    grouped = True  # HSTULayer passes token types to norms that declare this

    def __init__(self, dim: int, *, rngs: nnx.Rngs, num_types: int = NUM_TOKEN_TYPES, eps: float = 1e-6):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (num_types, dim), (None, "norm"))
        self.bias = param(rngs, nnx.initializers.zeros, (num_types, dim), (None, "norm"))

    def __call__(self, x: jax.Array, token_types: jax.Array | None = None) -> jax.Array:
        if token_types is None:  # plain event sequence: every token is an event
            token_types = jnp.full(x.shape[:-1], TOKEN_EVENT, jnp.int32)
        y = layer_norm(x, self.eps)
        # Select rows by a one-hot product rather than a gather: the gather's gradient is a
        # scatter-add of every token into a handful of rows, which serialises on atomics on a
        # GPU; the product's gradient is a [num_types, D] matrix product.
        onehot = jax.nn.one_hot(token_types, self.scale.shape[0], dtype=jnp.float32)
        scale = jnp.einsum("...t,td->...d", onehot, self.scale[...].astype(jnp.float32)).astype(y.dtype)
        bias = jnp.einsum("...t,td->...d", onehot, self.bias[...].astype(jnp.float32)).astype(y.dtype)
        return y * scale + bias

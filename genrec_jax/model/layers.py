"""Small building blocks whose parameters carry logical axis names.

Every parameter is an ``nnx.Param`` with an ``axes`` metadata tuple (``("embed", "mlp")``
...). ``genrec_jax.sharding`` maps those names onto mesh axes with one rules table, so
changing the parallelism is a config edit, never a model edit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), shape, jnp.float32), axes=tuple(axes))


class Dense(nnx.Module):
    """y = x W (+ b), W: [in, out] with logical axes ``axes``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        dtype=jnp.float32,
        init=None,
    ):
        init = init or nnx.initializers.lecun_normal()
        self.kernel = param(rngs, init, (in_dim, out_dim), axes)
        self.bias = param(rngs, nnx.initializers.zeros, (out_dim,), (axes[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table [num, dim]; row 0 is a learned (or padding) row like any other."""

    def __init__(self, num: int, dim: int, *, axes: tuple[str | None, str | None], rngs: nnx.Rngs, std: float = 0.02):
        self.embedding = param(rngs, nnx.initializers.normal(std), (num, dim), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, axis_name: str = "norm", affine: bool = True):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,)) if affine else None
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis_name,)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Normalise the last axis to zero mean / unit variance (statistics in float32)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (evaluation) or rate == 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class KeySeq:
    """Hands out independent dropout keys inside one forward pass (None when evaluating)."""

    def __init__(self, key: jax.Array | None):
        self._key = key
        self._n = 0

    def __call__(self) -> jax.Array | None:
        if self._key is None:
            return None
        self._n += 1
        return jax.random.fold_in(self._key, self._n)

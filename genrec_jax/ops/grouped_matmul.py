"""Grouped matmul of the MoE's ``blocked`` routing, with a pure-JAX reference.

    out[t] = x[t] @ w[tile_expert[t]]          x [T, M, K], w [E, K, N] -> [T, M, N]

``tile_expert`` is non-decreasing (the routing sorts the tiles by expert). The reference
selects each tile's weights by a one-hot product (a [T, K, N] copy, whose gradient is a
matmul, not a scatter-add) and runs one batched matmul; the Triton kernels
(``genrec_jax.kernels.grouped_matmul``) read ``w[e]`` in place. ``backend`` picks one as for
the attention op (``auto``: the kernels on a CUDA device with jax-triton).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genrec_jax.ops.hstu_attention import Backend, resolve_backend


def grouped_matmul_reference(x: jax.Array, w: jax.Array, tile_expert: jax.Array) -> jax.Array:
    oh = jax.nn.one_hot(tile_expert, w.shape[0], dtype=x.dtype)  # [T, E]
    wt = jnp.einsum("te,ekn->tkn", oh, w.astype(x.dtype))  # each tile's expert weights
    return jnp.einsum("tmk,tkn->tmn", x, wt)


def grouped_matmul(x: jax.Array, w: jax.Array, tile_expert: jax.Array, *, backend: Backend = "auto") -> jax.Array:
    """[T, M, N]; differentiable w.r.t. x and w either way. The kernels need M a power of
    two >= 16; smaller tiles use the reference."""
    m = x.shape[1]
    if resolve_backend(backend, op="grouped matmul") == "triton" and m >= 16 and not m & (m - 1):
        from genrec_jax.kernels.grouped_matmul import grouped_matmul_triton

        return grouped_matmul_triton(x, w, tile_expert)
    return grouped_matmul_reference(x, w, tile_expert)

"""Pairwise dot-product feature interaction (DLRM style), with a pure-JAX reference.

For x [B, F, D] (F feature embeddings per row) the op returns the F(F-1)/2 dot products
<x_i, x_j>, i < j, in row-major (i-major) order — (0,1), (0,2), ..., (0,F-1), (1,2), ... —
optionally preceded by a dense vector [B, Dd]: out [B, Dd + F(F-1)/2] in x's dtype (dot
products accumulate in float32). ``backend`` picks the Triton kernels
(``genrec_jax.kernels.interaction``) or the reference, as for the attention op.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from genrec_jax.ops.hstu_attention import Backend, resolve_backend


def pairwise_interaction_reference(x: jax.Array, dense: jax.Array | None = None) -> jax.Array:
    """einsum for the Gram matrices, then a gather of the strict upper triangle."""
    f = x.shape[1]
    g = jnp.einsum("bfd,bgd->bfg", x, x, preferred_element_type=jnp.float32)
    iu, ju = np.triu_indices(f, k=1)
    pairs = g[:, iu, ju].astype(x.dtype)
    if dense is None:
        return pairs
    return jnp.concatenate([dense.astype(x.dtype), pairs], axis=1)


def pairwise_interaction(x: jax.Array, dense: jax.Array | None = None, *, backend: Backend = "auto") -> jax.Array:
    """x [B, F, D], dense [B, Dd] or None -> [B, Dd + F(F-1)/2]; differentiable either way."""
    if resolve_backend(backend, op="interaction") == "triton":
        from genrec_jax.kernels.interaction import interaction_triton
        from genrec_jax.sharding import per_shard

        # Opaque to XLA's partitioner: run per batch shard under a sharded jit.
        return per_shard(lambda x, dense: interaction_triton(x, dense), dict(x=x, dense=dense),
                         dict(x=("batch", None, None), dense=("batch", None)), ("batch", None))
    return pairwise_interaction_reference(x, dense)

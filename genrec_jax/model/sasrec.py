"""SASRec layer (Kang & McAuley 2018): pre-norm causal softmax self-attention + pointwise FFN.

Kept in the same framework as HSTU (same embeddings, heads, losses and evaluation) so the
two encoders are compared with everything else equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.model.hstu import SeqContext
from genrec_jax.model.layers import Dense, LayerNorm, dropout
from genrec_jax.ops.hstu_attention import attention_mask


class SASRecLayer(nnx.Module):
    def __init__(self, embed_dim: int, *, num_heads: int, ffn_dim: int, dropout_rate: float,
                 attn_dropout: float, rngs: nnx.Rngs, dtype=jnp.float32):
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout_rate, self.attn_dropout, self.dtype = dropout_rate, attn_dropout, dtype
        self.attn_norm = LayerNorm(embed_dim, rngs=rngs)
        self.wq = Dense(embed_dim, embed_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wk = Dense(embed_dim, embed_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wv = Dense(embed_dim, embed_dim, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wo = Dense(embed_dim, embed_dim, axes=("heads", "embed"), rngs=rngs, dtype=dtype)
        self.ffn_norm = LayerNorm(embed_dim, rngs=rngs)
        self.ffn1 = Dense(embed_dim, ffn_dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.ffn2 = Dense(ffn_dim, embed_dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, ctx: SeqContext, key=None):
        b, n, d = x.shape
        h = self.attn_norm(x)
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.wq(h)), split(self.wk(h)), split(self.wv(h))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
        mask = attention_mask(ctx.lengths, n, ctx.num_targets)[:, None]
        s = jnp.where(mask, s, -1e30)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(mask, p, 0.0)  # fully masked (padding) rows give zeros, not uniform
        p = dropout(p, self.attn_dropout, key() if key else None)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(self.dtype), v).reshape(b, n, d)
        x = x + dropout(self.wo(o), self.dropout_rate, key() if key else None).astype(x.dtype)
        h = self.ffn_norm(x)
        f = self.ffn2(dropout(jax.nn.gelu(self.ffn1(h)), self.dropout_rate, key() if key else None))
        x = x + dropout(f, self.dropout_rate, key() if key else None).astype(x.dtype)
        return x, {}

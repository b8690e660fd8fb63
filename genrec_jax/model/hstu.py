"""HSTU layer (Zhai et al. 2024, "Actions Speak Louder than Words"), as the paper writes it:

    U, V, Q, K = split(SiLU(W1 · Norm(x)))                       # pointwise projection
    A          = SiLU(alpha · Q Kᵀ + rab(pos, Δt)) / n  (causal)   # pointwise attention
    y          = x + W2 · (Norm(A V) ⊙ U)                        # gated transformation

Optionally followed by a feed-forward block (dense or MoE, the UGT extension):
    y = y + FFN(Norm(y)).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.model.layers import Dense, LayerNorm, dropout, param
from genrec_jax.ops.hstu_attention import hstu_attention, hstu_attention_cached


class SeqContext(NamedTuple):
    """Per-batch sequence metadata shared by every layer."""

    lengths: jax.Array  # [B] valid tokens
    timestamps: jax.Array | None = None  # [B, N] int32 seconds (relative to a per-row origin)
    query_timestamps: jax.Array | None = None  # [B, N] time each token's prediction is made
    num_targets: jax.Array | None = None  # [B] M-FALCON candidates at the end of each row
    token_types: jax.Array | None = None  # [B, N] int32 (Group LayerNorm)


class LayerCache(NamedTuple):
    """One layer's keys and values for the tokens seen so far."""

    k: jax.Array  # [B, C, H, Dqk]
    v: jax.Array  # [B, C, H, Dv]


class HSTULayer(nnx.Module):
    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        attn_dim: int,
        linear_dim: int,
        max_len: int,
        dropout_rate: float,
        attn_norm: str,
        rab_position: bool,
        rab_time: bool,
        num_time_buckets: int,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        backend: str = "auto",
        remat_attention: bool = False,
        query_block: int = 0,
        dq_mode: str = "auto",
        make_norm=None,
        ffn: nnx.Module | None = None,
    ):
        self.num_heads, self.attn_dim, self.linear_dim = num_heads, attn_dim, linear_dim
        self.max_len, self.dropout_rate, self.attn_norm = max_len, dropout_rate, attn_norm
        self.backend, self.dtype, self.remat_attention = backend, dtype, remat_attention
        self.query_block = query_block
        self.dq_mode = dq_mode
        make_norm = make_norm or (lambda d: LayerNorm(d, rngs=rngs))
        self.in_norm = make_norm(embed_dim)
        # W1: [embed, heads, 2*dv + 2*dqk]; heads kept as their own axis so tensor
        # parallelism splits whole heads.
        self.w1 = param(
            rngs, nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
            (embed_dim, num_heads, 2 * linear_dim + 2 * attn_dim), ("embed", "heads", None),
        )
        self.b1 = param(rngs, nnx.initializers.zeros, (num_heads, 2 * linear_dim + 2 * attn_dim), ("heads", None))
        self.attn_out_norm = LayerNorm(num_heads * linear_dim, rngs=rngs)
        self.w2 = param(
            rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
            (num_heads, linear_dim, embed_dim), ("heads", None, "embed"),
        )
        self.b2 = param(rngs, nnx.initializers.zeros, (embed_dim,), ("embed",))
        # Relative attention bias tables, shared by heads (as in the paper's code).
        self.pos_bias = param(rngs, nnx.initializers.zeros, (max_len + 1,), (None,)) if rab_position else None
        self.time_bias = param(rngs, nnx.initializers.zeros, (num_time_buckets,), (None,)) if rab_time else None
        self.ffn = ffn
        self.ffn_norm = make_norm(embed_dim) if ffn is not None else None

    # ----------------------------------------------------------------- pieces

    def _norm(self, norm, x, ctx: SeqContext):
        return norm(x, ctx.token_types) if getattr(norm, "grouped", False) else norm(x)

    def project(self, x: jax.Array, ctx: SeqContext):
        """U, V, Q, K for every token: [B, N, H, dv] x2, [B, N, H, dqk] x2."""
        h = self._norm(self.in_norm, x, ctx).astype(self.dtype)
        uvqk = jnp.einsum("bnd,dhe->bnhe", h, self.w1[...].astype(self.dtype)) + self.b1[...].astype(self.dtype)
        uvqk = jax.nn.silu(uvqk)
        dv, dqk = self.linear_dim, self.attn_dim
        u, v, q, k = jnp.split(uvqk, [dv, 2 * dv, 2 * dv + dqk], axis=-1)
        return u, v, q, k

    def _bias_tables(self, ctx: SeqContext):
        pos = self.pos_bias[...] if self.pos_bias is not None else None
        tb = self.time_bias[...] if (self.time_bias is not None and ctx.timestamps is not None) else None
        return pos, tb

    def finish(self, x, attn, u, ctx: SeqContext, key):
        """y = x + W2 (Norm(A V) ⊙ U), then the optional FFN block. Returns (y, aux)."""
        b, n = attn.shape[:2]
        a = self.attn_out_norm(attn.reshape(b, n, -1)).reshape(attn.shape)
        g = dropout(a * u, self.dropout_rate, key() if key else None)
        y = jnp.einsum("bnhe,hed->bnd", g, self.w2[...].astype(self.dtype)) + self.b2[...].astype(self.dtype)
        x = x + y.astype(x.dtype)
        aux = {}
        if self.ffn is not None:
            h = self._norm(self.ffn_norm, x, ctx)
            f, aux = self.ffn(h, valid=_valid_mask(ctx, n), key=key() if key else None)
            x = x + dropout(f, self.dropout_rate, key() if key else None).astype(x.dtype)
        return x, aux

    # ----------------------------------------------------------------- full sequence

    def __call__(self, x: jax.Array, ctx: SeqContext, key=None, return_cache: bool = False):
        u, v, q, k = self.project(x, ctx)
        pos, tb = self._bias_tables(ctx)
        attn = hstu_attention(
            q, k, v, ctx.lengths,
            max_len=self.max_len, norm=self.attn_norm, num_targets=ctx.num_targets,
            pos_bias=pos, time_bias=tb,
            timestamps=ctx.timestamps if tb is not None else None,
            query_timestamps=ctx.query_timestamps if tb is not None else None,
            backend=self.backend, remat=self.remat_attention, query_block=self.query_block, dq_mode=self.dq_mode,
        )
        y, aux = self.finish(x, attn, u, ctx, key)
        if return_cache:
            return y, aux, LayerCache(k=k, v=v)
        return y, aux

    def last_rows(self, x: jax.Array, ctx: SeqContext, rows: jax.Array, return_cache: bool = False):
        """The full-sequence pass with one output row per sequence: keys and values for every
        token (the cache needs them), but the attention, the gated output and the FFN only
        for row ``rows[b]`` of sequence b. Equal to ``self(x, ctx)[0]`` at those rows (tested);
        for a last layer whose other rows nobody reads (serving's user vector), that skips the
        attention and FFN of all other tokens. No M-FALCON targets. Returns (y [B, 1, D],
        cache or None)."""
        if ctx.num_targets is not None:
            raise ValueError("last_rows does not take M-FALCON targets")
        u, v, q, k = self.project(x, ctx)
        pos, tb = self._bias_tables(ctx)
        qts = ctx.query_timestamps if ctx.query_timestamps is not None else ctx.timestamps
        attn = hstu_attention_cached(
            _pick(q, rows), k, v, rows[:, None], ctx.lengths,
            max_len=self.max_len, norm=self.attn_norm, pos_bias=pos, time_bias=tb,
            k_timestamps=ctx.timestamps if tb is not None else None,
            q_timestamps=_pick(qts, rows) if tb is not None else None,
            backend=self.backend,
        )
        ctx1 = SeqContext(lengths=jnp.minimum(ctx.lengths, 1),
                          token_types=_pick(ctx.token_types, rows) if ctx.token_types is not None else None)
        y, _ = self.finish(_pick(x, rows), attn, _pick(u, rows), ctx1, None)
        return y, (LayerCache(k=k, v=v) if return_cache else None)

    # ----------------------------------------------------------------- incremental

    def extend(
        self,
        x_new: jax.Array,  # [B, M, D] new tokens
        cache: LayerCache,  # [B, C, ...]
        start: jax.Array,  # [B] tokens already in the cache (the new ones go from here)
        ctx_new: SeqContext,  # lengths = valid new tokens [B]; timestamps etc. of the new tokens
        k_timestamps: jax.Array | None = None,  # [B, C] timestamps of the cache slots
        candidates: bool = False,
    ):
        """Run new tokens against the cache: the exact equal of the full-sequence pass.

        ``candidates=False`` (incremental prefill / decode): the new tokens are appended to
        the cache at ``start`` and attend causally. ``candidates=True`` (M-FALCON): the new
        tokens are candidates that see the cached history (``start`` tokens) and themselves
        only; the cache is returned unchanged. Returns (y [B, M, D], cache).
        """
        u, v, q, k = self.project(x_new, ctx_new)
        b, m = x_new.shape[:2]
        c = cache.k.shape[1]
        pos, tb = self._bias_tables(ctx_new)
        if tb is not None and k_timestamps is None:
            raise ValueError("time bias needs the cache's k_timestamps")
        if not candidates:
            cache = LayerCache(k=_write_rows(cache.k, k, start), v=_write_rows(cache.v, v, start))
            k_all, v_all = cache.k, cache.v
            q_positions = start[:, None] + jnp.arange(m)[None, :]
            kv_len = start + ctx_new.lengths
            hist = None
            k_ts = _write_rows(k_timestamps, ctx_new.timestamps, start) if tb is not None else None
        else:
            k_all = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
            v_all = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
            # Candidates sit after the cache slots; only the first `start` slots are history.
            q_positions = jnp.broadcast_to(c + jnp.arange(m)[None, :], (b, m))
            kv_len = jnp.full((b,), c + m, jnp.int32)
            hist = start
            k_ts = jnp.concatenate([k_timestamps, ctx_new.timestamps], axis=1) if tb is not None else None
        attn = hstu_attention_cached(
            q, k_all, v_all, q_positions, kv_len,
            max_len=self.max_len, norm=self.attn_norm, hist_lengths=hist,
            pos_bias=pos, time_bias=tb, k_timestamps=k_ts,
            q_timestamps=ctx_new.query_timestamps if tb is not None else None,
            backend=self.backend,
        )
        y, _ = self.finish(x_new, attn, u, ctx_new, None)
        return y, cache


def _pick(a: jax.Array, rows: jax.Array) -> jax.Array:
    """a[b, rows[b]] for every b, keeping a length-1 sequence axis: [B, N, ...] -> [B, 1, ...]."""
    return jnp.take_along_axis(a, rows.reshape((-1, 1) + (1,) * (a.ndim - 2)), axis=1)


def _valid_mask(ctx: SeqContext, n: int) -> jax.Array:
    return jnp.arange(n)[None, :] < ctx.lengths[:, None]


def _write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf[b, start[b] : start[b] + M] = new[b] for every row (start may differ per row)."""

    def one(bb, nn, s):
        return jax.lax.dynamic_update_slice_in_dim(bb, nn.astype(bb.dtype), s, axis=0)

    return jax.vmap(one)(buf, new, start)

"""The sequential recommender: event embeddings -> encoder stack (HSTU or SASRec) -> heads.

One event token = item embedding + action embedding + time-gap embedding + position
embedding. The retrieval head scores the next item by the (cosine) dot product of the
encoder state with the item table, which is tied to the input item embeddings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.config import ModelConfig
from genrec_jax.data.types import TOKEN_CONTEXT, TOKEN_EVENT, TOKEN_ITEM, TOKEN_USER
from genrec_jax.model.group_norm import GroupLayerNorm
from genrec_jax.model.heads import TaskHeads
from genrec_jax.model.hstu import HSTULayer, LayerCache, SeqContext
from genrec_jax.model.layers import DTYPES, Dense, Embed, KeySeq, LayerNorm, dropout
from genrec_jax.model.moe import DenseFFN, MoEFFN
from genrec_jax.model.sasrec import SASRecLayer
from genrec_jax.ops.hstu_attention import time_bucket

Batch = dict[str, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Recommender(nnx.Module):
    """HSTU / SASRec retrieval model. ``cfg`` is the model section of the config."""

    def __init__(self, cfg: ModelConfig, *, num_items: int, num_actions: int, max_len: int, rngs: nnx.Rngs,
                 action_names: tuple[str, ...] = (), item_codes=None, code_sizes=None):
        self.cfg = cfg
        self.action_names = tuple(action_names)
        self.num_items, self.num_actions, self.max_len = num_items, num_actions, max_len
        d = cfg.embed_dim
        self.dtype = DTYPES[cfg.dtype]
        self.item_emb = Embed(num_items + 1, d, axes=("vocab", "embed"), rngs=rngs, std=1.0 / math.sqrt(d))
        # +1 action slot: "unknown" (M-FALCON candidates, whose action is what we predict).
        self.action_emb = Embed(num_actions + 1, d, axes=(None, "embed"), rngs=rngs) if cfg.action_embedding else None
        self.time_emb = Embed(cfg.num_time_buckets, d, axes=(None, "embed"), rngs=rngs) if cfg.time_embedding else None
        ms = cfg.multiscale
        # Multi-scale prefix: [user profile token, context tokens, pooled long-term windows].
        self.num_fixed_prefix = (1 if ms.enabled and ms.user_profile_dim > 0 else 0) + (
            ms.num_context_tokens if ms.enabled else 0)
        self.max_prefix = self.num_fixed_prefix + (ms.max_long_tokens if ms.enabled else 0)
        self.total_len = max_len + self.max_prefix  # longest token sequence the encoder sees
        self.pos_emb = Embed(self.total_len + 1, d, axes=(None, "embed"), rngs=rngs) if cfg.position_embedding else None
        if ms.enabled:
            self.profile_proj = Dense(ms.user_profile_dim, d, axes=(None, "embed"), rngs=rngs) if ms.user_profile_dim > 0 else None
            # Context features are small integer ids (e.g. hour-of-day, weekday buckets).
            self.context_emb = Embed(CONTEXT_VOCAB * max(ms.num_context_tokens, 1), d, axes=(None, "embed"), rngs=rngs)
            self.long_proj = Dense(d, d, axes=("embed", None), rngs=rngs, dtype=self.dtype)
        self.type_emb = Embed(4, d, axes=(None, "embed"), rngs=rngs) if (ms.enabled or cfg.tasks.enabled) else None
        make_norm = (lambda dim: GroupLayerNorm(dim, rngs=rngs)) if cfg.group_norm else None
        layers = []
        for _ in range(cfg.num_layers):
            if cfg.arch == "hstu":
                ffn = None
                if cfg.ffn == "moe":
                    ffn = MoEFFN(d, cfg.moe, rngs=rngs, dtype=self.dtype)
                elif cfg.ffn == "dense":
                    ffn = DenseFFN(d, cfg.ffn_dim, rngs=rngs, dtype=self.dtype, dropout_rate=cfg.dropout)
                layers.append(
                    HSTULayer(
                        d, num_heads=cfg.num_heads, attn_dim=cfg.attn_dim, linear_dim=cfg.linear_dim,
                        max_len=self.total_len, dropout_rate=cfg.dropout, attn_norm=cfg.attn_norm,
                        rab_position=cfg.rab_position, rab_time=cfg.rab_time,
                        num_time_buckets=cfg.num_time_buckets, rngs=rngs, dtype=self.dtype,
                        backend=cfg.attention_backend, remat_attention=cfg.attention_remat,
                        query_block=cfg.attention_query_block, dq_mode=cfg.attention_dq_mode,
                        make_norm=make_norm, ffn=ffn,
                    )
                )
            else:
                layers.append(
                    SASRecLayer(d, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, dropout_rate=cfg.dropout,
                                attn_dropout=cfg.attn_dropout, rngs=rngs, dtype=self.dtype)
                )
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else layers
        self.final_norm = GroupLayerNorm(d, rngs=rngs) if cfg.group_norm else LayerNorm(d, rngs=rngs)
        self.tasks = TaskHeads(d, cfg.tasks, rngs=rngs, dtype=self.dtype,
                               with_profile=ms.enabled and ms.user_profile_dim > 0) if cfg.tasks.enabled else None
        # --- semantic-ID decoder (genrec_jax.semantic_ids): None unless cfg.decoder.enabled.
        if cfg.decoder.enabled:
            from genrec_jax.semantic_ids.decoder import ItemCodes, SemanticIDDecoder, check_item_codes

            codes, sizes = check_item_codes(item_codes, code_sizes, num_items)
            self.decoder = SemanticIDDecoder(d, sizes, cfg.decoder, moe=cfg.moe, rngs=rngs, dtype=self.dtype)
            self.item_codes = ItemCodes(codes)  # non-param state, reloaded from <codes_dir>/codes.npy
        else:
            self.decoder = self.item_codes = None
        # --- end semantic-ID decoder

    # ----------------------------------------------------------------- embeddings

    def embed_events(self, items, actions, timestamps, prev_timestamp=None, hist_lengths=None,
                     all_candidates=False):
        """Event token embeddings [B, N, D]: item + action + time-gap bucket (no position).

        The gap of an event is its time minus the previous event's. M-FALCON candidates
        (tokens at or past ``hist_lengths``, or every token with ``all_candidates``) all
        measure it from the last history event, so a candidate's input does not depend on
        which other candidates share the request.
        """
        x = self.item_emb(items) * math.sqrt(self.cfg.embed_dim)
        if self.action_emb is not None:
            x = x + self.action_emb(actions)
        if self.time_emb is not None and timestamps is not None:
            prev = jnp.concatenate([timestamps[:, :1], timestamps[:, :-1]], axis=1)
            if prev_timestamp is not None:  # incremental pass: the event before the first new one
                prev = prev.at[:, 0].set(prev_timestamp)
            if all_candidates and prev_timestamp is not None:
                prev = jnp.broadcast_to(prev_timestamp[:, None], timestamps.shape)
            elif hist_lengths is not None:
                j = jnp.arange(timestamps.shape[1])[None, :]
                last_hist = jnp.take_along_axis(timestamps, jnp.maximum(hist_lengths - 1, 0)[:, None], axis=1)
                prev = jnp.where(j >= hist_lengths[:, None], last_hist, prev)
            x = x + self.time_emb(time_bucket(timestamps - prev, self.cfg.num_time_buckets))
        return x

    def _token_types(self, lengths, n, num_targets):
        types = jnp.full((lengths.shape[0], n), TOKEN_EVENT, jnp.int32)
        if num_targets is not None:
            j = jnp.arange(n)[None, :]
            types = jnp.where(j >= (lengths - num_targets)[:, None], TOKEN_ITEM, types)
        return types

    def _prefix(self, batch: Batch):
        """Multi-scale prefix tokens [B, P, D], their valid count [B], timestamps and types."""
        ms = self.cfg.multiscale
        b = batch["items"].shape[0]
        d = self.cfg.embed_dim
        parts, ts_parts, types = [], [], []
        first_ts = batch["long_timestamps"][:, :1] if "long_timestamps" in batch else jnp.zeros((b, 1), jnp.int32)
        first_ts = jnp.minimum(first_ts, batch["timestamps"][:, :1]) if "timestamps" in batch else first_ts
        if self.profile_proj is not None:
            prof = batch.get("user_features", jnp.zeros((b, ms.user_profile_dim), jnp.float32))
            parts.append(self.profile_proj(prof.astype(jnp.float32))[:, None, :])
            ts_parts.append(first_ts)
            types.append(jnp.full((b, 1), TOKEN_USER, jnp.int32))
        c = ms.num_context_tokens
        if c:
            ctx_ids = batch.get("context", jnp.zeros((b, c), jnp.int32))
            offs = jnp.arange(c, dtype=jnp.int32)[None, :] * CONTEXT_VOCAB
            parts.append(self.context_emb(jnp.clip(ctx_ids, 0, CONTEXT_VOCAB - 1) + offs))
            ts_parts.append(jnp.broadcast_to(first_ts, (b, c)))
            types.append(jnp.full((b, c), TOKEN_CONTEXT, jnp.int32))
        w = ms.max_long_tokens
        if "long_items" in batch:
            li, la = batch["long_items"], batch["long_actions"]  # [B, W, window]
            ev = self.embed_events(li.reshape(b, -1), la.reshape(b, -1), None).reshape(li.shape + (d,))
            m = (li > 0)[..., None].astype(ev.dtype)
            pooled = jnp.sum(ev * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)
            parts.append(self.long_proj(pooled))
            ts_parts.append(batch["long_timestamps"])
            num_long = batch["num_long"]
        else:
            parts.append(jnp.zeros((b, w, d), self.dtype))
            ts_parts.append(jnp.broadcast_to(first_ts, (b, w)))
            num_long = jnp.zeros((b,), jnp.int32)
        types.append(jnp.full((b, w), TOKEN_EVENT, jnp.int32))
        x = jnp.concatenate([p.astype(self.dtype) for p in parts], axis=1)
        ts = jnp.concatenate([t.astype(jnp.int32) for t in ts_parts], axis=1)
        return x, self.num_fixed_prefix + num_long, ts, jnp.concatenate(types, axis=1)

    def embed(self, batch: Batch, key: KeySeq | None = None, positions: jax.Array | None = None,
              candidates: bool = False):
        """Token embeddings [B, T, D], the sequence context, and the offset [B] of the event
        tokens inside the sequence (non-zero only with the multi-scale prefix)."""
        items = batch["items"]
        b, n = items.shape
        lengths = batch["lengths"]
        num_targets = batch.get("num_targets")
        ts = batch.get("timestamps")
        qts = batch.get("query_timestamps")
        hist_len = None if num_targets is None or candidates else lengths - num_targets
        x = self.embed_events(items, batch["actions"], ts, batch.get("prev_timestamp"), hist_len,
                              all_candidates=candidates)
        types = batch.get("token_types")
        if types is None:
            types = self._token_types(lengths, n, num_targets)
        offset = jnp.zeros((b,), jnp.int32)
        if self.cfg.multiscale.enabled:
            px, p_len, pts, ptypes = self._prefix(batch)
            x, ts, qts, types, lengths, offset = _pack_prefix(
                px, p_len, pts, ptypes, x.astype(self.dtype), ts, qts, types, lengths)
            n = x.shape[1]
        if self.type_emb is not None:
            x = x + self.type_emb(types)
        if self.pos_emb is not None:
            if positions is None:
                positions = _positions(lengths, n, num_targets)
            x = x + self.pos_emb(jnp.clip(positions, 0, self.total_len))
        valid = jnp.arange(n)[None, :] < lengths[:, None]
        x = jnp.where(valid[..., None], x, 0.0)
        x = dropout(x, self.cfg.dropout, key() if key else None).astype(self.dtype)
        ctx = SeqContext(lengths=lengths, timestamps=ts, query_timestamps=qts, num_targets=num_targets,
                         token_types=types if self.cfg.group_norm else None)
        return x, ctx, offset

    # ----------------------------------------------------------------- encoder

    def encode(self, batch: Batch, dropout_key: jax.Array | None = None, return_cache: bool = False):
        """Encoder states [B, N, D] of the event tokens (after the final norm) and auxiliary
        losses. With the multi-scale prefix, the prefix states are dropped so the result stays
        aligned with ``batch["items"]``."""
        key = KeySeq(dropout_key) if dropout_key is not None else None
        x, ctx, offset = self.embed(batch, key)
        x, aux_all, caches = self._run_layers(self.layers, x, ctx, key, return_cache)
        states = self.final_norm(x, ctx.token_types) if self.cfg.group_norm else self.final_norm(x)
        if self.cfg.multiscale.enabled:
            n = batch["items"].shape[1]
            idx = jnp.minimum(offset[:, None] + jnp.arange(n)[None, :], states.shape[1] - 1)
            states = jnp.take_along_axis(states, idx[..., None], axis=1)
        if return_cache:
            return states, aux_all, caches
        return states, aux_all

    def _run_layers(self, layers, x, ctx, key, return_cache: bool):
        """(x after ``layers``, their auxiliary losses averaged over all the model's layers,
        their K/V caches if ``return_cache``)."""
        aux_all: dict[str, jax.Array] = {}
        caches = []
        for layer in layers:
            if return_cache:
                x, aux, cache = layer(x, ctx, key, return_cache=True)
                caches.append(cache)
            else:
                x, aux = layer(x, ctx, key)
            for name, val in aux.items():
                aux_all[name] = aux_all.get(name, 0.0) + val / len(self.layers)
        return x, aux_all, caches

    def encode_last(self, batch: Batch, return_cache: bool = False):
        """The state of each row's last valid event [B, D] (``last_states(encode(batch)[0],
        lengths)``, for rows with at least one event), computing the last layer's attention
        and FFN for that token only: what serving needs for the user vector. With
        ``return_cache`` also every layer's K/V, as ``encode`` returns them. SASRec and
        batches with M-FALCON targets take the full pass."""
        if self.cfg.arch != "hstu" or batch.get("num_targets") is not None:
            out = self.encode(batch, return_cache=return_cache)
            last = self.last_states(out[0], batch["lengths"])
            return (last, out[2]) if return_cache else last
        x, ctx, _ = self.embed(batch, None)
        x, _, caches = self._run_layers(self.layers[:-1], x, ctx, None, return_cache)
        # Packed with the multi-scale prefix, the last event is still row lengths - 1.
        rows = jnp.maximum(ctx.lengths - 1, 0)
        y, cache = self.layers[-1].last_rows(x, ctx, rows, return_cache=return_cache)
        types = None
        if self.cfg.group_norm:
            types = jnp.take_along_axis(ctx.token_types, rows[:, None], axis=1)
        states = self.final_norm(y, types) if self.cfg.group_norm else self.final_norm(y)
        if return_cache:
            return states[:, 0], caches + [cache]
        return states[:, 0]

    def extend(self, batch_new: Batch, caches: list[LayerCache], start: jax.Array,
               k_timestamps: jax.Array | None, candidates: bool = False):
        """Encode only new tokens against per-layer caches (HSTU only). See HSTULayer.extend."""
        if self.cfg.arch != "hstu" or self.cfg.multiscale.enabled:
            raise NotImplementedError("incremental encoding needs the HSTU encoder without the multi-scale prefix")
        n_new = batch_new["items"].shape[1]
        if candidates:
            positions = jnp.broadcast_to(start[:, None], (start.shape[0], n_new))
        else:
            positions = start[:, None] + jnp.arange(n_new)[None, :]
        x, ctx, _ = self.embed(batch_new, None, positions=positions, candidates=candidates)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.extend(x, cache, start, ctx, k_timestamps=k_timestamps, candidates=candidates)
            new_caches.append(cache)
        out = self.final_norm(x, ctx.token_types) if self.cfg.group_norm else self.final_norm(x)
        return out, new_caches

    # ----------------------------------------------------------------- retrieval head

    def item_table(self) -> jax.Array:
        """Item vectors used for scoring [N + 1, D] (row 0 = padding)."""
        t = self.item_emb.embedding[...]
        return l2_normalize(t) if self.cfg.l2_norm else t

    def item_vectors(self, ids: jax.Array) -> jax.Array:
        """``item_table()[ids]`` without the whole table: the rows are gathered first and
        normalised after (the same values and gradients; a training step that reads only the
        targets and the sampled negatives skips a pass over every item, forward and backward)."""
        t = jnp.take(self.item_emb.embedding[...], ids, axis=0)
        return l2_normalize(t) if self.cfg.l2_norm else t

    def user_vectors(self, states: jax.Array) -> jax.Array:
        return l2_normalize(states) if self.cfg.l2_norm else states

    def logit_scale(self) -> float:
        return 1.0 / self.cfg.temperature if self.cfg.l2_norm else 1.0

    def score_items(self, user_vecs: jax.Array, item_vecs: jax.Array | None = None) -> jax.Array:
        """Logits [..., N + 1] against the whole table (or the given item vectors)."""
        table = self.item_table() if item_vecs is None else item_vecs
        return jnp.einsum("...d,nd->...n", user_vecs.astype(jnp.float32), table.astype(jnp.float32)) * self.logit_scale()

    def last_states(self, states: jax.Array, lengths: jax.Array) -> jax.Array:
        """The state of each row's last valid token [B, D]."""
        idx = jnp.maximum(lengths - 1, 0)
        return jnp.take_along_axis(states, idx[:, None, None], axis=1)[:, 0]


CONTEXT_VOCAB = 64  # ids per context feature (hour-of-day 0..23, weekday 0..6, ... fit)


def _pack_prefix(px, p_len, pts, ptypes, x, ts, qts, types, lengths):
    """Concatenate each row's valid prefix tokens and its event tokens contiguously.

    Prefix slots past ``p_len[b]`` (missing long-term windows) are squeezed out, so valid
    tokens always occupy ``[0, p_len + lengths)`` and the length-based causal mask holds.
    """
    b, p, _ = px.shape
    n = x.shape[1]
    total = p + n
    j = jnp.arange(total)[None, :]
    pl = p_len[:, None]
    src = jnp.where(j < pl, j, p + (j - pl))
    src = jnp.clip(src, 0, total - 1)
    gather = lambda a: jnp.take_along_axis(a, src.reshape(src.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
    x_all = gather(jnp.concatenate([px, x], axis=1))
    t_all = gather(jnp.concatenate([ptypes, types], axis=1))
    ts_all = qts_all = None
    if ts is not None:
        ts_all = gather(jnp.concatenate([pts, ts], axis=1))
        # A prefix token's prediction time is the next token's time.
        nxt = jnp.concatenate([ts_all[:, 1:], ts_all[:, -1:]], axis=1)
        q_ev = gather(jnp.concatenate([jnp.zeros_like(pts), qts if qts is not None else ts], axis=1))
        qts_all = jnp.where(j < pl, nxt, q_ev)
    return x_all, ts_all, qts_all, t_all, p_len + lengths, p_len


def _positions(lengths: jax.Array, n: int, num_targets: jax.Array | None) -> jax.Array:
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    if num_targets is None:
        return jnp.broadcast_to(idx, (lengths.shape[0], n))
    return jnp.minimum(idx, (lengths - num_targets)[:, None])


def build_model(cfg: ModelConfig, *, num_items: int, num_actions: int, max_len: int, seed: int = 0,
                action_names: tuple[str, ...] = (), item_codes=None, code_sizes=None) -> Recommender:
    """``item_codes`` int [N + 1, L] and ``code_sizes``: the semantic IDs the decoder writes, needed
    when ``cfg.decoder.enabled`` (see ``genrec_jax.semantic_ids.train_rqvae.load_item_codes``)."""
    return Recommender(cfg, num_items=num_items, num_actions=num_actions, max_len=max_len, rngs=nnx.Rngs(seed),
                       action_names=action_names, item_codes=item_codes, code_sizes=code_sizes)

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
from genrec_jax.model.hstu import HSTULayer, LayerCache, SeqContext
from genrec_jax.model.layers import DTYPES, Embed, KeySeq, LayerNorm, dropout
from genrec_jax.model.sasrec import SASRecLayer
from genrec_jax.ops.hstu_attention import time_bucket

Batch = dict[str, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Recommender(nnx.Module):
    """HSTU / SASRec retrieval model. ``cfg`` is the model section of the config."""

    def __init__(self, cfg: ModelConfig, *, num_items: int, num_actions: int, max_len: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_items, self.num_actions, self.max_len = num_items, num_actions, max_len
        d = cfg.embed_dim
        self.dtype = DTYPES[cfg.dtype]
        self.item_emb = Embed(num_items + 1, d, axes=("vocab", "embed"), rngs=rngs, std=1.0 / math.sqrt(d))
        # +1 action slot: "unknown" (M-FALCON candidates, whose action is what we predict).
        self.action_emb = Embed(num_actions + 1, d, axes=(None, "embed"), rngs=rngs) if cfg.action_embedding else None
        self.time_emb = Embed(cfg.num_time_buckets, d, axes=(None, "embed"), rngs=rngs) if cfg.time_embedding else None
        self.pos_emb = Embed(max_len + 1, d, axes=(None, "embed"), rngs=rngs) if cfg.position_embedding else None
        layers = []
        for _ in range(cfg.num_layers):
            if cfg.arch == "hstu":
                layers.append(
                    HSTULayer(
                        d, num_heads=cfg.num_heads, attn_dim=cfg.attn_dim, linear_dim=cfg.linear_dim,
                        max_len=max_len, dropout_rate=cfg.dropout, attn_norm=cfg.attn_norm,
                        rab_position=cfg.rab_position, rab_time=cfg.rab_time,
                        num_time_buckets=cfg.num_time_buckets, rngs=rngs, dtype=self.dtype,
                        backend=cfg.attention_backend,
                    )
                )
            else:
                layers.append(
                    SASRecLayer(d, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, dropout_rate=cfg.dropout,
                                attn_dropout=cfg.attn_dropout, rngs=rngs, dtype=self.dtype)
                )
        self.layers = nnx.List(layers) if hasattr(nnx, "List") else layers
        self.final_norm = LayerNorm(d, rngs=rngs)

    # ----------------------------------------------------------------- embeddings

    def embed(self, batch: Batch, key: KeySeq | None = None, positions: jax.Array | None = None):
        """Token embeddings [B, N, D] and the sequence context for the encoder."""
        items = batch["items"]
        b, n = items.shape
        lengths = batch["lengths"]
        x = self.item_emb(items) * math.sqrt(self.cfg.embed_dim)
        if self.action_emb is not None:
            x = x + self.action_emb(batch["actions"])
        ts = batch.get("timestamps")
        if self.time_emb is not None and ts is not None:
            gap = ts - jnp.concatenate([ts[:, :1], ts[:, :-1]], axis=1)
            if "prev_timestamp" in batch:  # incremental pass: gap of the first new token
                gap = gap.at[:, 0].set(ts[:, 0] - batch["prev_timestamp"])
            x = x + self.time_emb(time_bucket(gap, self.cfg.num_time_buckets))
        if self.pos_emb is not None:
            if positions is None:
                positions = _positions(lengths, n, batch.get("num_targets"))
            x = x + self.pos_emb(jnp.clip(positions, 0, self.max_len))
        valid = jnp.arange(n)[None, :] < lengths[:, None]
        x = jnp.where(valid[..., None], x, 0.0)
        x = dropout(x, self.cfg.dropout, key() if key else None).astype(self.dtype)
        ctx = SeqContext(
            lengths=lengths,
            timestamps=ts,
            query_timestamps=batch.get("query_timestamps"),
            num_targets=batch.get("num_targets"),
            token_types=batch.get("token_types"),
        )
        return x, ctx

    # ----------------------------------------------------------------- encoder

    def encode(self, batch: Batch, dropout_key: jax.Array | None = None, return_cache: bool = False):
        """Encoder states [B, N, D] (after the final norm) and auxiliary losses."""
        key = KeySeq(dropout_key) if dropout_key is not None else None
        x, ctx = self.embed(batch, key)
        aux_all: dict[str, jax.Array] = {}
        caches = []
        for layer in self.layers:
            if return_cache:
                x, aux, cache = layer(x, ctx, key, return_cache=True)
                caches.append(cache)
            else:
                x, aux = layer(x, ctx, key)
            for name, val in aux.items():
                aux_all[name] = aux_all.get(name, 0.0) + val / len(self.layers)
        states = self.final_norm(x)
        if return_cache:
            return states, aux_all, caches
        return states, aux_all

    def extend(self, batch_new: Batch, caches: list[LayerCache], start: jax.Array,
               k_timestamps: jax.Array | None, candidates: bool = False):
        """Encode only new tokens against per-layer caches (HSTU only). See HSTULayer.extend."""
        if self.cfg.arch != "hstu":
            raise NotImplementedError("incremental encoding needs the HSTU encoder")
        n_new = batch_new["items"].shape[1]
        if candidates:
            positions = jnp.broadcast_to(start[:, None], (start.shape[0], n_new))
        else:
            positions = start[:, None] + jnp.arange(n_new)[None, :]
        x, ctx = self.embed(batch_new, None, positions=positions)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.extend(x, cache, start, ctx, k_timestamps=k_timestamps, candidates=candidates)
            new_caches.append(cache)
        return self.final_norm(x), new_caches

    # ----------------------------------------------------------------- retrieval head

    def item_table(self) -> jax.Array:
        """Item vectors used for scoring [N + 1, D] (row 0 = padding)."""
        t = self.item_emb.embedding[...]
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


def _positions(lengths: jax.Array, n: int, num_targets: jax.Array | None) -> jax.Array:
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    if num_targets is None:
        return jnp.broadcast_to(idx, (lengths.shape[0], n))
    return jnp.minimum(idx, (lengths - num_targets)[:, None])


def build_model(cfg: ModelConfig, *, num_items: int, num_actions: int, max_len: int, seed: int = 0) -> Recommender:
    return Recommender(cfg, num_items=num_items, num_actions=num_actions, max_len=max_len, rngs=nnx.Rngs(seed))

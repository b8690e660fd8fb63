"""Semantic-ID decoder (TIGER / OneRec): writes the next item's code, level by level.

Inputs per level t (0..L-1, the de-duplication level last):

    x_0 = BOS + level_emb[0];   x_t = code_emb_{t-1}[c_{t-1}] + level_emb[t]

Each block (pre-norm)::

    x = x + SelfAttn(LN(x))              causal over the levels written so far
    x = x + CrossAttn(LN(x), memory)     memory = encoder states s_0..s_i (user history)
    x = x + FFN(LN(x))                   dense GELU, or the MoE FFN (model.moe)

and ``logits_t = Head_t(LN(x_t))`` over level t's codebook (a separate head per level, as
levels have different sizes). With ``history_bias`` (repeat-aware decoding) a learnt scalar
per level, ``r_t``, is added to the logit of every code c that continues the prefix written
so far into an item of the user's own history: ``logits_t[c] += r_t * seen_t(prefix, c)``
(:func:`history_prefix_masks`). ``history_bias_mode="item"`` (default) marks the code only
where the child holds a single item and that item is in the history (so the offset acts at
the level where a seen item's path becomes unique, where its siblings can take the mass);
``"prefix"`` marks it where any history item lies under the child; ``history_bias_levels`` >
0 keeps it to that many last levels. Trained with the cross entropy like every other weight, r_t
is what the data say about repeats: strongly negative where users never take an item twice
(Amazon Beauty), positive where they come back to the same items. ``history_bias_train=
"detached"`` fits r_t on the decoder's logits held fixed, so every other weight trains exactly
as without the option (the offsets are then a calibration of that model). Training (``decoder_loss``): for a sequence with states
s_0..s_{n-1} and next items t_0..t_{n-1}, position i decodes codes(t_i) from memory
s_0..s_i. Serving uses two functions, also what the ONNX export traces::

    prefill(states, lengths)                          -> CrossKV (per-layer K/V of the memory)
    decode_step(prev_codes, level, self_cache, cross) -> (logits [B, W, K_level], new cache)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genrec_jax.config import DecoderConfig, MoEConfig
from genrec_jax.model.layers import Dense, Embed, KeySeq, LayerNorm, dropout, param

NEG_INF = -1e30
REPEAT_BIAS_SCALE = 10.0  # default of model.decoder.history_bias_scale: offset in logits = this x its parameter


class ItemCodes(nnx.Variable):
    """The item -> semantic ID table int32 [N + 1, L] (row 0 padding). Not a parameter: it
    is never trained, lives in the model's non-param state, and is reloaded from
    ``<codes_dir>/codes.npy`` rather than from the train-state checkpoint."""


class CrossKV(NamedTuple):
    """Cross-attention keys / values of the memory, stacked over decoder layers."""

    k: jax.Array  # [layers, B, M, H, hd]
    v: jax.Array  # [layers, B, M, H, hd]
    valid: jax.Array  # bool [B, M]


class SelfKVCache(NamedTuple):
    """Self-attention keys / values of the levels decoded so far (slot t = level t)."""

    k: jax.Array  # [layers, B, W, L, H, hd]
    v: jax.Array  # [layers, B, W, L, H, hd]


def _attend(q, k, v, mask, eq_scores: str, eq_out: str):
    s = jnp.einsum(eq_scores, q, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    s = jnp.where(mask, s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)  # a row with nothing visible gives zeros, not a uniform mix
    return jnp.einsum(eq_out, p.astype(v.dtype), v)


class DecoderBlock(nnx.Module):
    def __init__(self, dim: int, memory_dim: int, cfg: DecoderConfig, moe: MoEConfig | None, *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        h, hd = cfg.num_heads, cfg.head_dim
        self.num_heads, self.head_dim, self.dropout_rate, self.dtype = h, hd, cfg.dropout, dtype
        dense = lambda i, o, axes: Dense(i, o, axes=axes, rngs=rngs, dtype=dtype)  # noqa: E731
        self.self_norm = LayerNorm(dim, rngs=rngs)
        self.wq, self.wk, self.wv = (dense(dim, h * hd, ("embed", "heads")) for _ in range(3))
        self.wo = dense(h * hd, dim, ("heads", "embed"))
        self.cross_norm = LayerNorm(dim, rngs=rngs)
        self.cq = dense(dim, h * hd, ("embed", "heads"))
        self.ck, self.cv = (dense(memory_dim, h * hd, ("embed", "heads")) for _ in range(2))
        self.co = dense(h * hd, dim, ("heads", "embed"))
        self.ffn_norm = LayerNorm(dim, rngs=rngs)
        if moe is not None:
            from genrec_jax.model.moe import MoEFFN

            self.ffn = MoEFFN(dim, moe, rngs=rngs, dtype=dtype)
        else:
            from genrec_jax.model.moe import DenseFFN

            self.ffn = DenseFFN(dim, cfg.ffn_dim, rngs=rngs, dtype=dtype, dropout_rate=cfg.dropout)

    def _split(self, t: jax.Array) -> jax.Array:
        return t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)

    def memory_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention K, V [B, M, H, hd] of the memory [B, M, Dm]."""
        return self._split(self.ck(memory)), self._split(self.cv(memory))

    def __call__(self, x, cross_k, cross_v, cross_mask, self_mask, cache=None, level: int | None = None,
                 key: KeySeq | None = None):
        """x [B, G, Q, D] (G hypotheses or positions, Q query levels); self keys are x's own
        (teacher forcing) or the ``cache`` [B, G, L, H, hd] with this step written at slot
        ``level``. ``self_mask`` broadcasts to [Q, S]; ``cross_mask`` to [B, G, M]."""
        k_ = key if key is not None else KeySeq(None)
        h = self.self_norm(x)
        q, k, v = self._split(self.wq(h)), self._split(self.wk(h)), self._split(self.wv(h))  # [B, G, Q, H, hd]
        new_cache = None
        if cache is not None:
            ck, cv = cache
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), level, axis=2)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), level, axis=2)
            k, v, new_cache = ck, cv, (ck, cv)
        a = _attend(q, k, v, self_mask[None, None, None], "bgqhd,bgshd->bghqs", "bghqs,bgshd->bgqhd")
        x = x + dropout(self.wo(a.reshape(*a.shape[:3], -1)), self.dropout_rate, k_()).astype(x.dtype)
        h = self.cross_norm(x)
        q = self._split(self.cq(h))
        m = cross_mask[:, :, None, None, :]  # [B, G, 1, 1, M]
        a = _attend(q, cross_k, cross_v, m, "bgqhd,bmhd->bghqm", "bghqm,bmhd->bgqhd")
        x = x + dropout(self.co(a.reshape(*a.shape[:3], -1)), self.dropout_rate, k_()).astype(x.dtype)
        f, aux = self.ffn(self.ffn_norm(x), None, k_())
        x = x + dropout(f, self.dropout_rate, k_()).astype(x.dtype)
        return x, aux, new_cache


class SemanticIDDecoder(nnx.Module):
    """Causal decoder over semantic-ID codes with cross-attention to encoder states."""

    def __init__(self, memory_dim: int, code_sizes: Sequence[int], cfg: DecoderConfig, *,
                 moe: MoEConfig | None = None, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        self.code_sizes = tuple(int(k) for k in code_sizes)
        self.num_levels = len(self.code_sizes)
        self.dim = d = cfg.num_heads * cfg.head_dim
        self.dtype = dtype
        self.bos = param(rngs, nnx.initializers.normal(0.02), (d,), ("embed",))
        self.level_emb = Embed(self.num_levels, d, axes=(None, "embed"), rngs=rngs)
        self.code_emb = nnx.List([Embed(k, d, axes=("vocab", "embed"), rngs=rngs) for k in self.code_sizes[:-1]])
        self.blocks = nnx.List([
            DecoderBlock(d, memory_dim, cfg, moe if cfg.use_moe else None, rngs=rngs, dtype=dtype)
            for _ in range(cfg.num_layers)
        ])
        self.final_norm = LayerNorm(d, rngs=rngs)
        self.heads = nnx.List([Dense(d, k, axes=("embed", "vocab"), rngs=rngs, dtype=dtype) for k in self.code_sizes])
        # One learnt logit offset per level for codes that continue into a history item (None: off),
        # stored divided by REPEAT_BIAS_SCALE (see repeat_offsets). Zeros drawn without the RNG, so
        # the option leaves every other weight's initialisation as it was for the same seed.
        self.repeat_bias = (nnx.Param(jnp.zeros((self.num_levels,), jnp.float32), axes=(None,))
                            if cfg.history_bias else None)

    # ----------------------------------------------------------------- inputs

    def embed_level(self, prev_codes: jax.Array, level: int) -> jax.Array:
        """Input vector [..., D] of ``level`` given the previous level's code (ignored at 0)."""
        if level == 0:
            x = jnp.broadcast_to(self.bos[...], (*prev_codes.shape, self.dim))
        else:
            x = self.code_emb[level - 1](prev_codes)
        return (x + self.level_emb.embedding[level]).astype(self.dtype)

    def embed_teacher(self, codes: jax.Array, num_levels: int) -> jax.Array:
        """Inputs [..., T, D] for target ``codes`` [..., >= T - 1] (BOS, c_0, ..., c_{T-2})."""
        xs = [self.embed_level(codes[..., max(t - 1, 0)], t) for t in range(num_levels)]
        return jnp.stack(xs, axis=-2)

    # ----------------------------------------------------------------- memory

    def prefill(self, states: jax.Array, lengths: jax.Array) -> CrossKV:
        """Cross-attention K/V of the memory: states [B, M, Dm] (valid: index < lengths)."""
        ks, vs = zip(*(blk.memory_kv(states.astype(self.dtype)) for blk in self.blocks))
        valid = jnp.arange(states.shape[1])[None, :] < lengths[:, None]
        return CrossKV(jnp.stack(ks), jnp.stack(vs), valid)

    # ----------------------------------------------------------------- teacher forcing

    def __call__(self, codes: jax.Array, cross: CrossKV, memory_mask: jax.Array | None = None,
                 num_levels: int | None = None, key: jax.Array | None = None,
                 history: tuple[jax.Array, jax.Array] | None = None):
        """Logits of every level given the true codes of the earlier ones.

        codes int [B, G, L] (targets), ``memory_mask`` bool [B, G, M] (default: the memory's
        own validity). ``history``: (codes int [B, N, L] of the history items, visible bool
        [B, G, N]: which of them each row has seen, and per-level marks bool [B, N, L] or
        None -- see :meth:`history_marks`), used when ``history_bias`` is on.
        Returns (list over levels of [B, G, K_t], aux losses).
        """
        t = num_levels or self.num_levels
        ks = KeySeq(key) if key is not None else None
        x = self.embed_teacher(codes, t)  # [B, G, T, D]
        b, g = codes.shape[:2]
        mm = memory_mask if memory_mask is not None else jnp.broadcast_to(cross.valid[:, None], (b, g, cross.valid.shape[1]))
        causal = jnp.tril(jnp.ones((t, t), bool))
        aux_all: dict[str, jax.Array] = {}
        for i, blk in enumerate(self.blocks):
            x, aux, _ = blk(x, cross.k[i], cross.v[i], mm, causal, key=ks)
            for name, val in aux.items():
                aux_all[name] = aux_all.get(name, 0.0) + val / len(self.blocks)
        h = self.final_norm(x)
        logits = [self.heads[level](h[:, :, level]).astype(jnp.float32) for level in range(t)]
        if self.repeat_bias is not None and history is not None:
            seen = history_prefix_masks(history[0], history[1], codes, self.code_sizes[:t], marks=history[2])
            logits = [self.add_repeat_bias(lg, level, s_) for level, (lg, s_) in enumerate(zip(logits, seen))]
        return logits, aux_all

    def history_marks(self, item_codes: jax.Array, items: jax.Array) -> jax.Array | None:
        """Per level, which history items ``items`` [B, N] may mark a code there: bool
        [B, N, L] in "item" mode (their path is unique at that level: the child holds that
        one item), None in "prefix" mode (every one)."""
        if self.repeat_bias is None or self.cfg.history_bias_mode != "item":
            return None
        return jnp.take(prefix_sizes(item_codes), items, axis=0) == 1

    def repeat_offsets(self) -> jax.Array:
        """The per-level repeat offsets r_t in logit units, float32 [L]. The parameter holds
        r / ``history_bias_scale`` (default REPEAT_BIAS_SCALE): Adam moves a parameter by
        about the learning rate per step, so a raw scalar would need thousands of steps to
        reach the several nats a never-repeating catalogue calls for."""
        r = self.cfg.history_bias_scale * self.repeat_bias[...].astype(jnp.float32)
        n = self.cfg.history_bias_levels
        if 0 < n < self.num_levels:  # only the last n levels (the others stay 0, and get no gradient)
            r = jnp.where(jnp.arange(self.num_levels) >= self.num_levels - n, r, 0.0)
        return r

    def add_repeat_bias(self, logits: jax.Array, level: int, seen: jax.Array) -> jax.Array:
        """logits [..., K_level] + r_level where ``seen`` [..., K_level] (identity when off)."""
        if self.repeat_bias is None:
            return logits
        return logits + self.repeat_offsets()[level].astype(logits.dtype) * seen.astype(logits.dtype)

    # ----------------------------------------------------------------- cached decoding

    def init_cache(self, batch: int, width: int) -> SelfKVCache:
        shape = (len(self.blocks), batch, width, self.num_levels, self.cfg.num_heads, self.cfg.head_dim)
        return SelfKVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def decode_step(self, prev_codes: jax.Array, level: int, cache: SelfKVCache, cross: CrossKV):
        """One level for W hypotheses per row: prev_codes int [B, W] (the code chosen at
        ``level - 1``; ignored at level 0), ``level`` a Python int. Returns
        (logits float32 [B, W, K_level], updated cache)."""
        x = self.embed_level(prev_codes, level)[:, :, None, :]  # [B, W, 1, D]
        self_mask = (jnp.arange(self.num_levels) <= level)[None, :]  # [1, L]
        mm = jnp.broadcast_to(cross.valid[:, None, :], (x.shape[0], x.shape[1], cross.valid.shape[1]))
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            x, _, (ck, cv) = blk(x, cross.k[i], cross.v[i], mm, self_mask, cache=(cache.k[i], cache.v[i]), level=level)
            ks.append(ck)
            vs.append(cv)
        logits = self.heads[level](self.final_norm(x[:, :, 0])).astype(jnp.float32)
        return logits, SelfKVCache(jnp.stack(ks), jnp.stack(vs))


# --------------------------------------------------------------------------- history masks


def seen_codes(match: jax.Array, history_codes: jax.Array, level: int, size: int) -> jax.Array:
    """bool [B, G, size]: codes c such that some history item j with ``match`` [B, G, N] has
    code c at ``level`` (history_codes int [B, N, L]). One scatter of B x G x N flags (no
    [B, N, size] one-hot: N is up to serve.max_exclude = 1024 in the exclusion search)."""
    b, g, n = match.shape
    codes = jnp.broadcast_to(history_codes[:, None, :, level], (b, g, n))
    rows, hyps = jnp.arange(b)[:, None, None], jnp.arange(g)[None, :, None]
    return jnp.zeros((b, g, size), jnp.int32).at[rows, hyps, codes].add(match.astype(jnp.int32)) > 0


def follow_beams(match: jax.Array, parent: jax.Array, history_codes: jax.Array, level: int,
                 chosen: jax.Array) -> jax.Array:
    """Beam search's per-beam prefix match [B, W, N] after a level: the parent beam's, and
    the item's code at ``level`` equal to the code each beam chose (``chosen`` [B, W])."""
    return (jnp.take_along_axis(match, parent[..., None], axis=1)
            & (history_codes[:, None, :, level] == chosen[..., None]))


def prefix_sizes(item_codes: jax.Array) -> jax.Array:
    """int32 [N + 1, L]: for each item (rows 1..N) and level t, how many items share its
    first t + 1 codes (1 = its path is unique from level t on); row 0 (padding) is 0. Jittable
    (a lexicographic sort and segment counts); the export's NumPy driver has its own
    (``export/ort_client.prefix_sizes``), tested equal."""
    codes = jnp.asarray(item_codes)[1:]
    n, num_levels = codes.shape
    order = jnp.lexsort(tuple(codes[:, t] for t in reversed(range(num_levels))))  # level 0 most significant
    srt = codes[order]
    new = jnp.arange(n) == 0
    cols = []
    for t in range(num_levels):
        new = new | jnp.concatenate([jnp.ones((1,), bool), srt[1:, t] != srt[:-1, t]])
        seg = jnp.cumsum(new) - 1
        cols.append(jnp.zeros((n,), jnp.int32).at[seg].add(1)[seg])
    sizes = jnp.zeros((n, num_levels), jnp.int32).at[order].set(jnp.stack(cols, 1))
    return jnp.concatenate([jnp.zeros((1, num_levels), jnp.int32), sizes])


def history_prefix_masks(history_codes: jax.Array, visible: jax.Array, codes: jax.Array,
                         code_sizes: Sequence[int], marks: jax.Array | None = None) -> list[jax.Array]:
    """Per level t, bool [B, G, K_t]: the codes c for which some visible history item j has
    ``codes_j[:t] == codes[..., :t]`` and ``codes_j[t] == c`` (teacher forcing: the prefix
    is the true one), counting at level t only the items with ``marks[..., t]`` when given.
    history_codes int [B, N, L], visible bool [B, G, N], codes int [B, G, >= T], marks bool [B, N, L]."""
    match = visible
    out = []
    for t, size in enumerate(code_sizes):
        m = match if marks is None else match & marks[:, None, :, t]
        out.append(seen_codes(m, history_codes, t, size))
        if t + 1 < len(code_sizes):
            match = match & (history_codes[:, None, :, t] == codes[..., t:t + 1])
    return out


# --------------------------------------------------------------------------- training loss


def sample_positions(lengths: jax.Array, n: int, per_seq: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions [B, P] trained with the decoder loss and whether each is real.

    The last valid position is always first; the other P - 1 are drawn without replacement
    from the earlier ones (Gumbel top-k). ``per_seq`` 0 (or >= n): every position.
    """
    b = lengths.shape[0]
    if per_seq <= 0 or per_seq >= n:
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        return pos, pos < lengths[:, None]
    last = jnp.maximum(lengths - 1, 0).astype(jnp.int32)
    if per_seq == 1:
        return last[:, None], (lengths > 0)[:, None]
    g = jax.random.gumbel(key, (b, n))
    earlier = jnp.arange(n)[None, :] < (lengths - 1)[:, None]
    score = jnp.where(earlier, g, -jnp.inf)
    top, idx = jax.lax.top_k(score, per_seq - 1)
    pos = jnp.concatenate([last[:, None], idx.astype(jnp.int32)], axis=1)
    valid = jnp.concatenate([(lengths > 0)[:, None], jnp.isfinite(top)], axis=1)
    return pos, valid


def decoder_loss(decoder: SemanticIDDecoder, item_codes: jax.Array, states: jax.Array, lengths: jax.Array,
                 targets: jax.Array, key: jax.Array, positions_per_seq: int, dropout_key: jax.Array | None = None,
                 items: jax.Array | None = None, unlikelihood: float = 0.0, unlikelihood_levels: int = 1,
                 unlikelihood_positions: int = 0):
    """Next-token cross entropy of the codes of the next items (mean over levels and the
    sampled positions). states [B, N, Dm], targets [B, N] next item ids, item_codes [V, L].

    With ``unlikelihood`` > 0 and the input ``items`` [B, N], each sampled position also
    draws one item of the history it sees (items[0..pos], never the target itself) and adds
    ``unlikelihood`` x -log(1 - p), p = the decoder's probability of that item's last
    ``unlikelihood_levels`` codes given its earlier ones: the model learns from the data
    how unlikely a repeat is, instead of a filter at serving time. ``unlikelihood_positions``
    > 0 keeps the term's extra decoder pass cheap: that many of the sampled positions per
    sequence, drawn at random. The loss is reported as
    ``decoder_unlikelihood_loss`` (already weighted) and added to the total by the caller.
    """
    b, n = targets.shape
    pos, valid = sample_positions(lengths, n, positions_per_seq, key)  # [B, P]
    tgt = jnp.take_along_axis(targets, pos, axis=1)
    valid = valid & (tgt > 0)
    codes = jnp.take(item_codes, tgt, axis=0)  # [B, P, L]
    memory_mask = (jnp.arange(n)[None, None, :] <= pos[..., None]) & (jnp.arange(n)[None, None, :] < lengths[:, None, None])
    cross = decoder.prefill(states, lengths)
    history = None
    if decoder.repeat_bias is not None:
        if items is None:
            raise ValueError("model.decoder.history_bias needs the history items (items=) in decoder_loss")
        history = (jnp.take(item_codes, items, axis=0), memory_mask & (items > 0)[:, None, :],
                   decoder.history_marks(item_codes, items))
    detached = history is not None and decoder.cfg.history_bias_train == "detached"
    logits, aux = decoder(codes, cross, memory_mask, key=dropout_key, history=None if detached else history)

    def cross_entropy(lgs):
        return sum(optax.softmax_cross_entropy_with_integer_labels(lg, codes[..., t])
                   for t, lg in enumerate(lgs)) / len(lgs)

    ce = cross_entropy(logits)
    if detached:  # offsets fitted on fixed logits; the value is the offset model's loss, the
        # other weights' gradient that of the plain loss
        seen = history_prefix_masks(history[0], history[1], codes, decoder.code_sizes[:len(logits)],
                                    marks=history[2])
        logits = [decoder.add_repeat_bias(jax.lax.stop_gradient(lg), t, s_)
                  for t, (lg, s_) in enumerate(zip(logits, seen))]
        ce = cross_entropy(logits) + (ce - jax.lax.stop_gradient(ce))
    exact = jnp.stack([jnp.argmax(lg, -1) == codes[..., t] for t, lg in enumerate(logits)], -1).all(-1)
    w = valid.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    loss = jnp.sum(ce * w) / denom
    metrics = {"decoder_loss": loss, "decoder_greedy_acc": jnp.sum(exact * w) / denom}
    if decoder.repeat_bias is not None:  # the learnt repeat offsets, one per level (logged)
        offsets = decoder.repeat_offsets()
        for t in range(decoder.num_levels):
            metrics[f"decoder_repeat_bias_{t}"] = offsets[t]
    for name, val in aux.items():
        metrics[f"decoder_{name}"] = val
    if unlikelihood > 0 and items is not None:
        upos, uvalid, utgt, umask = pos, valid, tgt, memory_mask
        if 0 < unlikelihood_positions < pos.shape[1]:
            g = jax.random.gumbel(jax.random.fold_in(key, 0x0A2), pos.shape)
            _, sel = jax.lax.top_k(jnp.where(valid, g, -jnp.inf), unlikelihood_positions)
            upos, uvalid, utgt = (jnp.take_along_axis(x, sel, axis=1) for x in (pos, valid, tgt))
            umask = jnp.take_along_axis(memory_mask, sel[..., None], axis=1)
        u = jax.random.uniform(jax.random.fold_in(key, 0x0A1), upos.shape)
        hidx = jnp.minimum(jnp.floor(u * (upos + 1)).astype(jnp.int32), upos)  # a position the memory holds
        hist = jnp.take_along_axis(items, hidx, axis=1)
        hw = (uvalid & (hist > 0) & (hist != utgt)).astype(jnp.float32)
        hcodes = jnp.take(item_codes, hist, axis=0)
        hkey = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
        hhist = None if history is None or detached else (history[0], umask & (items > 0)[:, None, :], history[2])
        hlogits, _ = decoder(hcodes, cross, umask, key=hkey, history=hhist)
        first = len(hlogits) - max(1, min(unlikelihood_levels, len(hlogits)))
        logp = sum(jnp.take_along_axis(jax.nn.log_softmax(lg.astype(jnp.float32), -1), hcodes[..., t:t + 1],
                                       axis=-1)[..., 0]
                   for t, lg in enumerate(hlogits) if t >= first)
        ul = -jnp.log(-jnp.expm1(jnp.minimum(logp, -1e-6)))  # -log(1 - p), finite as p -> 1
        ul_loss = jnp.sum(ul * hw) / jnp.maximum(hw.sum(), 1.0)
        metrics["decoder_unlikelihood_loss"] = unlikelihood * ul_loss
        metrics["decoder_history_prob"] = jnp.sum(jnp.exp(logp) * hw) / jnp.maximum(hw.sum(), 1.0)
    return loss, metrics


def check_item_codes(item_codes, code_sizes, num_items: int):
    """Validate the item -> code table for a catalogue of ``num_items``; returns (codes as a
    jnp int32 [N + 1, L], code sizes). With only ``code_sizes`` (shape planning) the table is
    all zeros."""
    import numpy as np

    if item_codes is None and code_sizes is None:
        raise ValueError(
            "model.decoder.enabled needs the semantic IDs: pass item_codes (and code_sizes) to build_model; "
            "they come from `python train.py --stage rqvae` (<run_dir>/semantic_ids/codes.npy)")
    if item_codes is None:
        sizes = tuple(int(k) for k in code_sizes)
        return jnp.zeros((num_items + 1, len(sizes)), jnp.int32), sizes
    codes = np.asarray(item_codes)
    if codes.ndim != 2 or len(codes) != num_items + 1:
        raise ValueError(f"item_codes must be [num_items + 1, L] = [{num_items + 1}, L], got {codes.shape}: "
                         "were the semantic IDs made for another data set?")
    sizes = tuple(int(k) for k in code_sizes) if code_sizes is not None else tuple(int(c) + 1 for c in codes.max(0))
    if len(sizes) != codes.shape[1] or (codes < 0).any() or (codes >= np.asarray(sizes)).any():
        raise ValueError(f"item_codes do not fit the code sizes {sizes}")
    return jnp.asarray(codes.astype(np.int32)), sizes

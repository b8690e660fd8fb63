"""Trie-constrained beam search over semantic IDs, under ``jax.jit`` with a KV cache.

The driver only calls three functions, so the same loop runs the JAX decoder here, in
``serve.py``, and the exported ONNX graphs::

    cross = prefill(states, lengths)                              once per request
    cache = init_cache(batch, beam_width)                         zeros
    logits, cache = decode_step(prev_codes, level, cache, cross)  once per level

With ``history`` (a decoder trained with ``history_bias``), each level's logits get the
decoder's learnt repeat offset on the codes that continue a beam's prefix into one of the
user's history items; each beam tracks which history items still share its prefix.

At level t every live beam is extended by the children its trie node allows (codes the
trie does not allow never become candidates, i.e. score -inf); the best W of the
W x max_fanout candidates survive, and the self-attention cache is re-gathered to follow
its beams. A hypothesis' score is the sum of its codes' log-probabilities. Since every item
has exactly one path, the k final beams are k distinct real items. Slots left empty (fewer
than k valid items in reach) come back as item 0 with score -inf.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.semantic_ids.decoder import follow_beams, seen_codes
from genrec_jax.semantic_ids.trie import Trie


def beam_search(
    prefill: Callable,
    decode_step: Callable,
    init_cache: Callable,
    trie: Trie,
    states: jax.Array,
    lengths: jax.Array,
    *,
    beam_width: int,
    k: int,
    renormalize: bool = False,
    uniform_last_level: bool = False,
    history: tuple[Callable, jax.Array, jax.Array, jax.Array | None] | None = None,
    exclude: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` items (int32 [B, k], best first) and their log-prob scores [B, k].

    ``history``: (add_bias, codes int [B, N, L], valid bool [B, N], marks bool [B, N, L] or
    None) -- the users' history items' semantic IDs, which of them count at each level (the
    decoder's ``history_marks``) and ``add_bias(logits, level, seen)`` (the decoder's
    ``add_repeat_bias``), applied to every level's logits before the softmax.

    ``exclude``: (codes int [B, E, L], valid bool [B, E], marks bool [B, E, L]) of items
    that must not come back, marks = their path is unique at that level (``prefix_sizes ==
    1``). A candidate whose child holds only excluded items' paths is dropped where it
    becomes unique, so the beams go to other items and k results come back whenever k
    reachable items are left. The other candidates' scores are unchanged.

    ``beam_width`` (W) must be >= k. ``renormalize``: take each level's softmax over the
    codes the trie allows only (instead of the full codebook). ``uniform_last_level``: score
    the de-duplication level as uniform over a prefix's items (-log #siblings) instead of the
    learnt logits -- the de-dup code carries no content, and a cold-start item's slot was
    never a training target, so this is how freshly added items compete with their siblings.
    """
    if k > beam_width:
        raise ValueError(f"beam_width ({beam_width}) must be >= k ({k})")
    b = states.shape[0]
    w = beam_width
    num_levels = trie.num_levels
    cross = prefill(states, lengths)
    cache = init_cache(b, w)
    node = jnp.zeros((b, w), jnp.int32)
    prev = jnp.zeros((b, w), jnp.int32)
    score = jnp.where(jnp.arange(w)[None, :] == 0, 0.0, -jnp.inf) * jnp.ones((b, 1), jnp.float32)
    if history is not None:
        add_bias, hcodes, hvalid, marks = history
        match = jnp.broadcast_to(hvalid[:, None, :], (b, w, hvalid.shape[1]))  # [B, W, N] shares the prefix
    if exclude is not None:
        xcodes, xvalid, xmarks = exclude
        xmatch = jnp.broadcast_to(xvalid[:, None, :], (b, w, xvalid.shape[1]))  # [B, W, E]
    for level in range(num_levels):
        logits, cache = decode_step(prev, level, cache, cross)  # [B, W, K]
        if history is not None:
            m = match if marks is None else match & marks[:, None, :, level]
            logits = add_bias(logits, level, seen_codes(m, hcodes, level, logits.shape[-1]))
        if renormalize:
            logits = trie.mask_logits(level, node, logits)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        codes, nxt, valid = trie.children(level, node)  # [B, W, F]
        f = codes.shape[-1]
        step_logp = jnp.take_along_axis(logp, codes, axis=-1)
        if uniform_last_level and level == num_levels - 1:
            siblings = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(jnp.float32)
            step_logp = jnp.broadcast_to(-jnp.log(siblings), step_logp.shape)
        cand = score[..., None] + step_logp
        if exclude is not None:
            banned = seen_codes(xmatch & xmarks[:, None, :, level], xcodes, level, logp.shape[-1])  # [B, W, K]
            valid = valid & ~jnp.take_along_axis(banned, codes, axis=-1)
        cand = jnp.where(valid & jnp.isfinite(score)[..., None], cand, -jnp.inf).reshape(b, w * f)
        width = w if level < num_levels - 1 else k
        take = min(width, w * f)
        top, idx = jax.lax.top_k(cand, take)
        if take < width:  # fewer candidates than beams: pad with empty beams
            top = jnp.concatenate([top, jnp.full((b, width - take), -jnp.inf)], axis=1)
            idx = jnp.concatenate([idx, jnp.zeros((b, width - take), idx.dtype)], axis=1)
        alive = jnp.isfinite(top)
        parent = idx // f
        prev = jnp.where(alive, jnp.take_along_axis(codes.reshape(b, w * f), idx, axis=1), 0)
        node = jnp.where(alive, jnp.take_along_axis(nxt.reshape(b, w * f), idx, axis=1), 0).astype(jnp.int32)
        score = top
        if level < num_levels - 1 and history is not None:
            match = follow_beams(match, parent, hcodes, level, prev)
        if level < num_levels - 1 and exclude is not None:
            xmatch = follow_beams(xmatch, parent, xcodes, level, prev)
        if level < num_levels - 1:
            sel = parent[None, :, :, None, None, None]
            cache = type(cache)(*(jnp.take_along_axis(c, sel, axis=2) for c in cache))
    return jnp.where(jnp.isfinite(score), node, 0).astype(jnp.int32), score


def decoder_beam_search(decoder, trie: Trie, states: jax.Array, lengths: jax.Array, *, beam_width: int, k: int,
                        renormalize: bool = False, uniform_last_level: bool = False,
                        history_codes: jax.Array | None = None, history_valid: jax.Array | None = None,
                        history_marks: jax.Array | None = None, exclude=None):
    """``beam_search`` driven by a :class:`SemanticIDDecoder`'s own prefill / decode_step.
    ``history_codes`` int [B, N, L] / ``history_valid`` bool [B, N] / ``history_marks`` bool
    [B, N, L] or None (the decoder's ``history_marks``): the users' history items, needed
    (and only used) when the decoder has the repeat offsets. ``exclude``: see ``beam_search``."""
    history = None
    if getattr(decoder, "repeat_bias", None) is not None:
        if history_codes is None or history_valid is None:
            raise ValueError("this decoder was trained with model.decoder.history_bias: beam search needs the "
                             "users' history items (history_codes, history_valid)")
        history = (decoder.add_repeat_bias, history_codes, history_valid, history_marks)
    return beam_search(decoder.prefill, decoder.decode_step, decoder.init_cache, trie, states, lengths,
                       beam_width=beam_width, k=k, renormalize=renormalize, uniform_last_level=uniform_last_level,
                       history=history, exclude=exclude)


def history_of(model, items: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(codes int [B, N, L], valid bool [B, N], marks bool [B, N, L] or None) of history item
    ids ``items`` [B, N] (0 = none), for the model's repeat-aware decoder."""
    table = model.item_codes[...]
    return jnp.take(table, items, axis=0), items > 0, model.decoder.history_marks(table, items)


def memory_of(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Encoder states [B, N, D] and lengths of a Recommender on an (eval) batch."""
    states, _ = model.encode(batch)
    return states, batch["lengths"]


def recommend(model, trie: Trie, batch: dict, *, beam_width: int, k: int, renormalize: bool = False,
              uniform_last_level: bool = False):
    """Encode the histories and beam-search the next items: (items [B, k], scores [B, k])."""
    if getattr(model, "decoder", None) is None:
        raise ValueError("the model has no semantic-ID decoder (model.decoder.enabled=false)")
    states, lengths = memory_of(model, batch)
    hcodes = hvalid = marks = None
    if model.decoder.repeat_bias is not None:
        hcodes, hvalid, marks = history_of(model, batch["items"])
    return decoder_beam_search(model.decoder, trie, states, lengths, beam_width=beam_width, k=k,
                               renormalize=renormalize, uniform_last_level=uniform_last_level,
                               history_codes=hcodes, history_valid=hvalid, history_marks=marks)


def make_recommend_fn(model, *, beam_width: int, k: int, renormalize: bool = False,
                      uniform_last_level: bool = False) -> Callable:
    """A jitted ``fn(state, batch, trie) -> (items, scores)`` for ``nnx.split(model)``'s graph;
    call it with the state from ``nnx.split(model)[1]`` (or the train state's params merged
    with the rest)."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def fn(state, batch, trie):
        m = nnx.merge(graphdef, state)
        return recommend(m, trie, batch, beam_width=beam_width, k=k, renormalize=renormalize,
                         uniform_last_level=uniform_last_level)

    return fn


def score_all_items(decoder, item_codes: jax.Array, states: jax.Array, lengths: jax.Array, *,
                    renormalize_trie: Trie | None = None, history_items: jax.Array | None = None) -> jax.Array:
    """Exhaustive scores [B, V] (log-prob of every item's full code; column 0 = -inf): the
    reference beam search approximates. Costs one teacher-forced pass per item: tiny
    catalogues (tests) only. ``history_items`` int [B, N] (0 = none): the users' histories,
    for a decoder with the repeat offsets."""
    cross = decoder.prefill(states, lengths)
    b = states.shape[0]
    v = item_codes.shape[0]
    codes = jnp.broadcast_to(item_codes[None], (b, v, item_codes.shape[1]))
    history = None
    if history_items is not None:
        visible = jnp.broadcast_to((history_items > 0)[:, None, :], (b, v, history_items.shape[1]))
        history = (jnp.take(item_codes, history_items, axis=0), visible,
                   decoder.history_marks(item_codes, history_items))
    logits, _ = decoder(codes, cross, history=history)
    total = jnp.zeros((b, v), jnp.float32)
    if renormalize_trie is not None:
        node = jnp.zeros((b, v), jnp.int32)
    for t, lg in enumerate(logits):
        if renormalize_trie is not None:
            lg = renormalize_trie.mask_logits(t, node, lg)
            node = jnp.maximum(renormalize_trie.step(t, node, codes[..., t]), 0)
        total = total + jnp.take_along_axis(jax.nn.log_softmax(lg, -1), codes[..., t:t + 1], axis=-1)[..., 0]
    return total.at[:, 0].set(-jnp.inf)

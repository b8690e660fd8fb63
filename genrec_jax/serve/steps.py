"""The compiled serving steps: pure functions of (model, K/V slot pool, padded inputs).

Every request's history goes through the device-resident slot pool:

    prefill  [B, S]  encode whole windows, write their K/V (+ states) into slots
    extend   [B, M]  returning users: only the M new tokens, against the K/V already in
                     their slots (incremental prefill; exact, see prefix_cache.py)
    retrieve [B]     top-k of the retrieval head over the item table, exclusions applied
    recommend [B, S] anonymous requests: encode + retrieve in one step, nothing written to
                     the pool (no user to cache under; saves the K/V writes and a dispatch)
    generate [B]     trie-constrained beam search of the semantic-ID decoder
    rank     [B, M]  M-FALCON: M candidates per row attend to the row's cached history
                     and to themselves only; multi-task probabilities + retrieval logits

Anonymous requests use scratch slots, so one code path serves cached and uncached users,
and the heads read the history from the pool without a round trip to the host. The
engine compiles each step ahead of time for every bucket shape (``jax.jit(...).lower(...)
.compile()``), with the pool donated so its update is in place.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.data.types import TOKEN_ITEM
from genrec_jax.model.hstu import LayerCache

NEG_INF = float("-inf")


class Pool(NamedTuple):
    """K/V of the encoded windows, one slot per user (slot 0: filler rows' scratch)."""

    k: jax.Array  # [layers, P, C, H, Dqk]
    v: jax.Array  # [layers, P, C, H, Dv]
    user: jax.Array  # float32 [P, D]: state of each slot's last token (the user vector)
    states: jax.Array | None  # [P, C, D] every token's state (the decoder's memory), if any


def pool_shapes(model, num_slots: int, capacity: int, dtype, with_states: bool) -> Pool:
    """ShapeDtypeStructs of a pool for ``model`` (bytes = what ``Pool`` would allocate)."""
    layer = model.layers[0]
    n, h = len(model.layers), layer.num_heads
    d = model.cfg.embed_dim
    sds = jax.ShapeDtypeStruct
    return Pool(
        k=sds((n, num_slots, capacity, h, layer.attn_dim), dtype),
        v=sds((n, num_slots, capacity, h, layer.linear_dim), dtype),
        user=sds((num_slots, d), jnp.float32),
        states=sds((num_slots, capacity, d), dtype) if with_states else None,
    )


def pool_bytes(shapes: Pool) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def _gather_caches(pool: Pool, slots: jax.Array) -> list[LayerCache]:
    return [LayerCache(pool.k[i][slots], pool.v[i][slots]) for i in range(pool.k.shape[0])]


def _write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buf[b, start[b] : start[b] + M] = new[b] (start + M must fit: the pool has room)."""
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0))(
        buf, new, start)


def _take_last(y: jax.Array, lengths: jax.Array) -> jax.Array:
    idx = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(y, idx[:, None, None], axis=1)[:, 0]


# --------------------------------------------------------------------------- encode


def prefill_step(model, pool: Pool, batch: dict, slots: jax.Array, *, last_only: bool = True) -> Pool:
    """Encode windows [B, S] and store their K/V, states and last state in ``slots``.

    Without a decoder memory (``pool.states``) only the last token's state is kept, so the
    last layer runs its attention and FFN for that token only (``encode_last``; unless
    ``last_only`` is false)."""
    s = batch["items"].shape[1]
    st = None
    if pool.states is not None or not last_only:
        states, _, caches = model.encode(batch, return_cache=True)
        user = model.last_states(states, batch["lengths"])
        if pool.states is not None:
            st = pool.states.at[slots, :s].set(states.astype(pool.states.dtype))
    else:
        user, caches = model.encode_last(batch, return_cache=True)
    k = jnp.stack([c.k for c in caches]).astype(pool.k.dtype)  # [layers, B, S, H, Dqk]
    v = jnp.stack([c.v for c in caches]).astype(pool.v.dtype)
    user = user.astype(jnp.float32)
    return Pool(pool.k.at[:, slots, :s].set(k), pool.v.at[:, slots, :s].set(v), pool.user.at[slots].set(user), st)


def extend_step(model, pool: Pool, new: dict, start: jax.Array, k_timestamps: jax.Array, slots: jax.Array) -> Pool:
    """Encode M new tokens per row after the ``start`` tokens already in the row's slot.

    ``new``: items, actions, timestamps, query_timestamps [B, M] (relative to the window's
    first event), lengths [B] (valid new tokens), prev_timestamp [B] (event start - 1's
    time); ``k_timestamps`` [B, C]: times of the cached tokens.
    """
    y, caches = model.extend(new, _gather_caches(pool, slots), start, k_timestamps, candidates=False)
    k = jnp.stack([c.k for c in caches]).astype(pool.k.dtype)
    v = jnp.stack([c.v for c in caches]).astype(pool.v.dtype)
    user = _take_last(y, new["lengths"]).astype(jnp.float32)
    st = None
    if pool.states is not None:
        st = pool.states.at[slots].set(_write_rows(pool.states[slots], y, start))
    return Pool(pool.k.at[:, slots].set(k), pool.v.at[:, slots].set(v), pool.user.at[slots].set(user), st)


# --------------------------------------------------------------------------- heads


def exclude_mask(scores: jax.Array, exclude: jax.Array) -> jax.Array:
    """``scores`` [B, V] with the ids in ``exclude`` [B, E] (0 = no id) and padding at -inf."""
    rows = jnp.arange(scores.shape[0])[:, None]
    return scores.at[rows, exclude].set(NEG_INF).at[:, 0].set(NEG_INF)


def retrieve_step(model, item_table: jax.Array, num_items: jax.Array, user: jax.Array, slots: jax.Array,
                  exclude: jax.Array, *, k: int):
    """Top-``k`` items (ids, logits [B, k]) of the retrieval head for the slots' users.

    ``item_table`` is ``model.item_table()`` computed once at load (it is normalised when
    the model scores by cosine), so a request does not renormalise the catalogue; its
    rows past ``num_items`` (room for cold-start items) are never recommended.
    """
    return _top_items(model, item_table, num_items, user[slots], exclude, k)


def recommend_step(model, item_table: jax.Array, num_items: jax.Array, batch: dict, exclude: jax.Array, *, k: int,
                   last_only: bool = True):
    """``prefill_step`` + ``retrieve_step`` for rows that nobody will extend: the windows
    [B, S] are encoded and their last states scored at once, and the pool is not touched.
    The last layer runs for each row's last token only (``encode_last``) unless ``last_only``
    is false."""
    if last_only:
        user = model.encode_last(batch)
    else:
        user = model.last_states(model.encode(batch)[0], batch["lengths"])
    user = user.astype(jnp.float32)
    return _top_items(model, item_table, num_items, user, exclude, k)


def _top_items(model, item_table, num_items, user, exclude, k):
    u = model.user_vectors(user)
    scores = model.score_items(u, item_table)
    scores = jnp.where(jnp.arange(scores.shape[1])[None, :] > num_items, NEG_INF, scores)
    scores = exclude_mask(scores, exclude)
    top, ids = jax.lax.top_k(scores, k)
    return ids.astype(jnp.int32), top


def generate_step(model, pool: Pool, slots: jax.Array, lengths: jax.Array, exclude: jax.Array, trie: Any,
                  history: tuple | None = None, excluded: tuple | None = None, *, beam_width: int, max_len: int,
                  search: Callable):
    """Beam search over semantic IDs from the slots' encoder states. ``excluded``: (codes,
    valid, marks) of ``exclude``'s items (``SemanticSide.exclusion_codes``): they are dropped
    inside the search, where their paths become unique, so the beams go to other items;
    ``exclude`` [B, E] (ids) is also checked on the final beams. ``history``: (codes [B,
    max_len, L], valid [B, max_len], marks [B, max_len, L] or None) of the rows' history
    items, for a decoder with the repeat offsets (``model.decoder.history_bias``)."""
    memory = pool.states[slots][:, :max_len]
    hcodes, hvalid, marks = history if history is not None else (None, None, None)
    ids, scores = search(model.decoder, trie, memory, lengths, beam_width=beam_width, k=beam_width,
                         history_codes=hcodes, history_valid=hvalid, history_marks=marks, exclude=excluded)
    hit = (ids[:, :, None] == exclude[:, None, :]).any(-1) | (ids == 0)
    scores = jnp.where(hit, NEG_INF, scores)
    top, order = jax.lax.top_k(scores, beam_width)
    return jnp.take_along_axis(ids, order, axis=1).astype(jnp.int32), top


def rank_step(model, item_table: jax.Array, pool: Pool, slots: jax.Array, hist_len: jax.Array,
              k_timestamps: jax.Array, cand: jax.Array, count: jax.Array, request_ts: jax.Array, *,
              unknown_action: int):
    """M-FALCON scores of candidates cand [B, M] (``count`` [B] real ones per row).

    Each candidate is a token at the position after the history, with the request time as
    its time and query time and the "unknown" action (its action is what is predicted).
    Every candidate gets the same time-gap input, measured from the last history event
    (as in training's candidate block), so its scores do not depend on its place in the list.
    The ranking heads take (candidate state, item embedding, last history state) as in
    training (``genrec_jax.train.step.candidate_features``).

    Returns (task probabilities [B, M, T] or None, retrieval logits [B, M]).
    """
    b, m = cand.shape
    ts = jnp.broadcast_to(request_ts[:, None], (b, m))
    new = {
        "items": cand,
        "actions": jnp.full((b, m), unknown_action, jnp.int32),
        "timestamps": ts,
        "query_timestamps": ts,
        "lengths": count,
        "prev_timestamp": jnp.take_along_axis(k_timestamps, jnp.maximum(hist_len - 1, 0)[:, None], axis=1)[:, 0],
        "token_types": jnp.full((b, m), TOKEN_ITEM, jnp.int32),
    }
    y, _ = model.extend(new, _gather_caches(pool, slots), hist_len, k_timestamps, candidates=True)
    user = pool.user[slots]
    probs = None
    if model.tasks is not None:
        logits = model.tasks(y, model.item_emb(cand), user.astype(y.dtype), None)
        probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    u = model.user_vectors(user)
    item_vecs = jnp.take(item_table, cand, axis=0).astype(jnp.float32)
    retrieval = jnp.einsum("bd,bmd->bm", u.astype(jnp.float32), item_vecs) * model.logit_scale()
    return probs, retrieval


# --------------------------------------------------------------------------- compiling


class ModelFn:
    """Turns a step ``fn(model, *args)`` into ``f(weights, *args)``; ``weights`` are the
    leaves of ``nnx.split``'s (params, rest), flattened once at load (flattening nnx
    Variables on every call would cost more host time than a small step's device time).

    Parameters may be stored in bfloat16 (device memory / bandwidth); they are cast back to
    float32 inside the step, so the model's own dtype policy (``model.dtype``) is unchanged.
    """

    def __init__(self, graphdef, treedef):
        self.graphdef = graphdef
        self.treedef = treedef  # of (params, rest): steps take the flat leaves (cheap to pass per call)

    def wrap(self, fn: Callable, **static) -> Callable:
        graphdef, treedef = self.graphdef, self.treedef

        def run(weights, *args):
            params, rest = jax.tree.unflatten(treedef, weights)
            params = jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                  params)
            model = nnx.merge(graphdef, params, rest)
            return fn(model, *args, **static)

        return run


def abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_step(fn: Callable, args: tuple, sharding, donate: tuple[int, ...] = (),
                 options: dict | None = None):
    """Ahead-of-time executable of ``fn`` for exactly the shapes of ``args`` (``options``:
    XLA compiler options, e.g. a lower optimisation level for quick CPU tests)."""
    return jax.jit(fn, donate_argnums=donate).lower(*abstract(args, sharding)).compile(compiler_options=options)


"""The engine with every serving optimisation off: the benchmarks' point of comparison.

* no batching: one request at a time;
* no shape buckets: plain ``jax.jit`` on each request's exact shapes (a new history length
  compiles on the request path);
* no prefix cache: every request encodes its whole window;
* beam search recomputes everything per decode step: the decoder re-runs all levels
  decoded so far, and the cross-attention K/V of the history, at every level;
* ranking without the M-FALCON cache: each candidate micro-batch re-encodes the history
  together with its candidates (one full sequence with ``num_targets``).

Same model, same math (tests compare the answers), so a benchmark's speed-up is what the
optimisations buy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from genrec_jax.serve.inputs import History, pad_batch


class _Codes(NamedTuple):
    """The "cache" of the no-cache beam search: the codes chosen so far, shaped like the
    decoder's KV cache ([1, B, W, L, 1, 1]) so ``beam_search`` re-gathers it to its beams."""

    codes: jax.Array


def no_cache_decoder(decoder):
    """(prefill, decode_step, init_cache) for ``semantic_ids.beam_search.beam_search`` that
    recompute every level from scratch (teacher-forced on the codes chosen so far)."""
    num_levels = decoder.num_levels

    def prefill(states, lengths):
        return states, lengths  # the raw memory: its K/V are recomputed at every step

    def init_cache(b, w):
        return _Codes(jnp.zeros((1, b, w, num_levels, 1, 1), jnp.int32))

    def decode_step(prev, level, cache, memory):
        codes = cache.codes[0, :, :, :, 0, 0]  # [B, W, L]
        if level > 0:
            codes = codes.at[:, :, level - 1].set(prev)
        logits, _ = decoder(codes, decoder.prefill(*memory), num_levels=level + 1)
        return logits[level], _Codes(codes[None, :, :, :, None, None])

    return prefill, decode_step, init_cache


class NaiveEngine:
    """``recommend`` / ``rank`` one request at a time, nothing cached but jit's own cache."""

    def __init__(self, model, *, beam_width: int = 16, rank_micro_batch: int = 256, trie=None):
        self.model = model
        self.max_len = int(model.max_len)
        self.beam_width = beam_width
        self.micro = rank_micro_batch
        self.trie = trie
        self.unknown_action = int(model.num_actions) if model.action_emb is not None else 0
        self._retrieve = jax.jit(self._retrieve_fn, static_argnames="k")
        self._generate = jax.jit(self._generate_fn)
        self._rank = jax.jit(self._rank_fn)

    # ----------------------------------------------------------------- steps

    def _retrieve_fn(self, batch, k):
        m = self.model
        states, _ = m.encode(batch)
        scores = m.score_items(m.user_vectors(m.last_states(states, batch["lengths"])))
        return jax.lax.top_k(scores.at[:, 0].set(-jnp.inf), k)

    def _generate_fn(self, batch, trie):
        from genrec_jax.semantic_ids.beam_search import beam_search, history_of

        states, _ = self.model.encode(batch)
        dec = self.model.decoder
        prefill, step, init = no_cache_decoder(dec)
        history = None
        if dec.repeat_bias is not None:
            history = (dec.add_repeat_bias, *history_of(self.model, batch["items"]))
        ids, scores = beam_search(prefill, step, init, trie, states, batch["lengths"],
                                  beam_width=self.beam_width, k=self.beam_width, history=history)
        return ids, scores

    def _rank_fn(self, batch):
        from genrec_jax.train.step import candidate_features

        m = self.model
        states, _ = m.encode(batch)
        cand, item, user, profile = candidate_features(m, states, batch)
        probs = jax.nn.sigmoid(m.tasks(cand, item, user, profile)) if m.tasks is not None else None
        u = m.user_vectors(user)
        retrieval = jnp.einsum("bd,bnd->bn", u.astype(jnp.float32),
                               jnp.take(m.item_table(), batch["items"], axis=0).astype(jnp.float32))
        return probs, retrieval * m.logit_scale()

    # ----------------------------------------------------------------- API

    def _batch(self, h: History) -> dict:
        w = h.window(self.max_len)
        return {k: jnp.asarray(v) for k, v in pad_batch([w], 1, len(w), self.max_len).items()}

    def recommend(self, h: History, k: int, mode: str = "retrieval") -> tuple[np.ndarray, np.ndarray]:
        if mode == "generative":
            ids, scores = self._generate(self._batch(h), self.trie)
            return np.asarray(ids)[0, :k], np.asarray(scores)[0, :k]
        scores, ids = self._retrieve(self._batch(h), k=k)
        return np.asarray(ids)[0], np.asarray(scores)[0]

    def rank(self, h: History, candidates: np.ndarray) -> dict[str, np.ndarray]:
        w = h.window(self.max_len)
        n = len(w)
        rel = (w.timestamps - w.timestamps[0]).astype(np.int32)
        req = np.int32(w.request_ts - int(w.timestamps[0]))
        probs, retr = [], []
        for o in range(0, len(candidates), self.micro):
            c = np.asarray(candidates[o:o + self.micro], np.int32)
            m = len(c)
            batch = {
                "items": np.concatenate([w.items, c])[None],
                "actions": np.concatenate([w.actions, np.full(m, self.unknown_action)])[None].astype(np.int32),
                "timestamps": np.concatenate([rel, np.full(m, req)])[None].astype(np.int32),
                "query_timestamps": np.concatenate([rel[1:], [req], np.full(m, req)])[None].astype(np.int32),
                "lengths": np.array([n + m], np.int32),
                "num_targets": np.array([m], np.int32),
            }
            p, r = self._rank(batch)
            retr.append(np.asarray(r)[0, n:])
            if p is not None:
                probs.append(np.asarray(p)[0, n:])
        out = {"retrieval": np.concatenate(retr)}
        if probs:
            allp = np.concatenate(probs)
            out.update({name: allp[:, t] for t, name in enumerate(self.model.tasks.tasks)})
        return out

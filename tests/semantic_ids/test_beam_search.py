"""Trie-constrained beam search: valid distinct items; its best beams equal exhaustive search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.config import DecoderConfig
from genrec_jax.semantic_ids.beam_search import beam_search, score_all_items
from genrec_jax.semantic_ids.decoder import SemanticIDDecoder
from genrec_jax.semantic_ids.trie import Trie

from .conftest import random_unique_codes

SIZES = (4, 3, 2)
NUM_ITEMS = 14


@pytest.fixture(scope="module")
def setup():
    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, dropout=0.0)
    dec = SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0))
    # Sharper, more varied logits than a fresh init gives, so the ranking is non-trivial.
    for head in dec.heads:
        head.kernel[...] = head.kernel[...] * 8.0
    table = random_unique_codes(np.random.default_rng(1), NUM_ITEMS, SIZES)
    trie = Trie.from_item_codes(table, SIZES)
    graphdef, state = nnx.split(dec)
    states = jax.random.normal(jax.random.key(2), (3, 5, 8))
    lengths = jnp.array([5, 3, 1])

    def search(state, trie, w, k, renorm):
        d = nnx.merge(graphdef, state)
        return beam_search(d.prefill, d.decode_step, d.init_cache, trie, states, lengths, beam_width=w, k=k,
                           renormalize=renorm)

    search = jax.jit(search, static_argnums=(2, 3, 4))

    @jax.jit
    def exhaustive(state, trie):
        d = nnx.merge(graphdef, state)
        return score_all_items(d, jnp.asarray(table), states, lengths), score_all_items(
            d, jnp.asarray(table), states, lengths, renormalize_trie=trie)

    return table, trie, state, search, exhaustive


@pytest.mark.parametrize("renorm", [False, True])
def test_best_beams_equal_exhaustive_search(setup, renorm):
    table, trie, state, search, exhaustive = setup
    full, full_renorm = exhaustive(state, trie)
    ref = np.asarray(full_renorm if renorm else full)
    k = 5
    items, scores = search(state, trie, NUM_ITEMS, k, renorm)  # W >= #items: exact
    items, scores = np.asarray(items), np.asarray(scores)
    for b in range(3):
        want = np.argsort(-ref[b])[:k]
        assert items[b, 0] == want[0], "the best beam is not the exhaustive argmax"
        np.testing.assert_array_equal(items[b], want)
        np.testing.assert_allclose(scores[b], ref[b, want], rtol=1e-4, atol=1e-4)


def test_beams_are_valid_and_distinct_with_narrow_beams(setup):
    table, trie, state, search, exhaustive = setup
    items, scores = search(state, trie, 4, 3, False)
    items, scores = np.asarray(items), np.asarray(scores)
    assert ((items >= 1) & (items <= NUM_ITEMS)).all(), "beam search returned a non-item"
    for row in items:
        assert len(set(row.tolist())) == len(row), "beam search returned duplicates"
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "scores must be sorted best first"
    full, _ = exhaustive(state, trie)
    np.testing.assert_allclose(scores, np.take_along_axis(np.asarray(full), items, 1), rtol=1e-4, atol=1e-4)


def test_k_larger_than_the_catalogue_pads_with_empty_slots(setup):
    _, _, state, search, _ = setup
    small = Trie.from_item_codes(np.array([[0, 0, 0], [0, 1, 0], [2, 0, 1], [2, 2, 0]]), SIZES)  # 3 items
    items, scores = search(state, small, 6, 5, False)
    items, scores = np.asarray(items), np.asarray(scores)
    assert (np.sort(items[:, :3], axis=1) == [1, 2, 3]).all()
    assert (items[:, 3:] == 0).all() and np.isneginf(scores[:, 3:]).all()
    with pytest.raises(ValueError, match="beam_width"):
        search(state, small, 2, 3, False)


def test_excluded_items_are_dropped_inside_the_search(setup):
    """Exclusion inside the search (where an excluded item's path becomes unique): with
    W >= #items the result is the exhaustive ranking without the excluded items, and the
    scores of the others are unchanged."""
    from genrec_jax.semantic_ids.decoder import prefix_sizes

    table, trie, state, _, exhaustive = setup
    full = np.asarray(exhaustive(state, trie)[0])
    ex = np.array([[3, 5, 9, 0], [1, 2, 0, 0], [0, 0, 0, 0]])
    graphdef = nnx.graphdef(SemanticIDDecoder(8, SIZES, DecoderConfig(enabled=True, num_layers=1, num_heads=2,
                                                                      head_dim=8, ffn_dim=16, dropout=0.0),
                                              rngs=nnx.Rngs(0)))
    states = jax.random.normal(jax.random.key(2), (3, 5, 8))
    lengths = jnp.array([5, 3, 1])
    t = jnp.asarray(table)
    exclude = (jnp.take(t, ex, axis=0), jnp.asarray(ex > 0), jnp.take(prefix_sizes(t), ex, axis=0) == 1)
    d = nnx.merge(graphdef, state)
    items, scores = beam_search(d.prefill, d.decode_step, d.init_cache, trie, states, lengths, beam_width=NUM_ITEMS,
                                k=5, exclude=exclude)
    items, scores = np.asarray(items), np.asarray(scores)
    for b in range(3):
        ref = full[b].copy()
        ref[ex[b][ex[b] > 0]] = -np.inf
        want = np.argsort(-ref, kind="stable")[:5]
        np.testing.assert_array_equal(items[b], want)
        np.testing.assert_allclose(scores[b], full[b, want], rtol=1e-4, atol=1e-4)

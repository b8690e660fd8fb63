"""Cold start without training: the content bridge, how newcomers pick code paths, and the
add_items contract with a (small, untrained) model that has a semantic-ID decoder.

The end-to-end check on a trained model is in test_pipeline.py; the measured share on the
synthetic benchmark is `python bench/semantic_ids.py synthetic`."""

import numpy as np
import pytest
from flax import nnx

from genrec_jax.config import RQVAEConfig, load_config, preset_path
from genrec_jax.semantic_ids.cold_start import (
    CapacityError, add_items, assign_new_codes, bridge_neighbours, content_voters, decoder_ranking,
)
from genrec_jax.semantic_ids.rqvae import RQVAE
from genrec_jax.semantic_ids.train_rqvae import SemanticIDs

from .conftest import random_unique_codes


def _sid(codes, sizes, in_dim: int = 6) -> SemanticIDs:
    """Semantic IDs with an (untrained, deterministic) RQ-VAE of the right shape."""
    cfg = RQVAEConfig(codebook_sizes=list(sizes[:-1]), latent_dim=4, hidden_dims=[8])
    return SemanticIDs(np.asarray(codes, np.int32), tuple(sizes), rqvae=RQVAE(in_dim, cfg, rngs=nnx.Rngs(0)))


def test_bridge_compares_content_by_what_predicts_users():
    """Few content features say who consumes an item, many do not (like sparse tags): raw
    nearest neighbours are mostly other groups' items, the bridge's are the item's own."""
    rng = np.random.default_rng(0)
    groups, n_old, n_new, dim = 6, 600, 120, 16
    centroids = 2.0 * rng.normal(size=(groups, 4))
    emb_centroids = rng.normal(size=(groups, dim))

    def draw(n):
        g = rng.integers(0, groups, n)
        return g, np.concatenate([centroids[g] + 0.5 * rng.normal(size=(n, 4)), rng.normal(size=(n, 100))], 1)

    g_old, x_old = draw(n_old)
    emb = emb_centroids[g_old] + 0.7 * rng.normal(size=(n_old, dim))  # collaborative, noisy
    g_new, x_new = draw(n_new)
    near = bridge_neighbours(x_old, emb, x_new, 10)
    raw = np.argsort(((x_new[:, None] - x_old[None]) ** 2).sum(-1), axis=1)[:, :10]
    purity = np.mean(g_old[near] == g_new[:, None])
    raw_purity = np.mean(g_old[raw] == g_new[:, None])
    assert raw_purity < 0.6, f"the test needs content whose raw distance misleads ({raw_purity:.2f})"
    assert purity > 0.85, f"bridge neighbours are not the new item's group: {purity:.2f} (raw {raw_purity:.2f})"


# item 1 on path A = (1, 2); items 2, 3 on path B = (3, 1); item 4 on path C = (2, 2)
CODES = [[0, 0, 0], [1, 2, 0], [3, 1, 0], [3, 1, 1], [2, 2, 0]]
A, B, C = (1, 2), (3, 1), (2, 2)


def test_newcomers_take_the_best_path_and_share_it_fairly():
    """Gain = beam score + log(#items before) - log(1 + #items now): the decoder's favourite
    path first, the runner-up once the favourite's exposure is split enough."""
    sid = _sid(CODES, (4, 4, 4))
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    preferred = np.array([[1, 2, 3, 0]] * 3)
    scores = np.array([[-1.0, -1.5, -1.5, -np.inf]] * 3)  # beam scores (B's include -log 2)
    codes, _ = assign_new_codes(sid, x, preferred=preferred, preferred_scores=scores)
    # A: -1 - log 2 = -1.69 > B: -1.5 + log 2 - log 3 = -1.91; then B > A: -1 - log 3 = -2.10;
    # then A: -2.10 > B: -1.5 + log 2 - log 4 = -2.19.
    assert [tuple(c[:2]) for c in codes] == [A, B, A]
    assert codes[:, 2].tolist() == [1, 2, 2]  # the first free de-duplication slots
    np.testing.assert_array_equal(sid.codes, np.asarray(CODES, np.int32))  # the catalogue is untouched


def test_full_paths_fall_back_to_free_ones_then_fail():
    sid = _sid(CODES, (4, 4, 2))  # two items per path at most: B is full, A and C have one slot each
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    preferred = np.array([[1, 2]] * 3)
    scores = np.array([[-1.0, -0.5]] * 3)  # B would be best
    codes, _ = assign_new_codes(sid, x[:2], preferred=preferred[:2], preferred_scores=scores[:2])
    assert [tuple(c[:2]) for c in codes] == [A, C]  # B full; then A full too: C is the free path left
    with pytest.raises(CapacityError):
        assign_new_codes(sid, x, preferred=preferred, preferred_scores=scores)


@pytest.fixture(scope="module")
def small():
    """An untrained Recommender with a semantic-ID decoder over 40 items, and its IDs."""
    from genrec_jax.model.recommender import build_model

    sizes = (4, 4, 4)
    cfg = load_config(preset_path("tiny"), [
        "model.decoder.enabled=true", "model.decoder.num_layers=1", "model.decoder.num_heads=2",
        "model.decoder.head_dim=8", "model.decoder.ffn_dim=16", "model.decoder.beam_width=8",
        "model.decoder.dropout=0.0", "model.dropout=0.0"])
    codes = random_unique_codes(np.random.default_rng(1), 40, sizes)
    model = build_model(cfg.model, num_items=40, num_actions=5, max_len=cfg.data.max_seq_len, seed=0,
                        item_codes=codes, code_sizes=sizes)
    for head in model.decoder.heads:  # sharper logits than a fresh init, so rankings differ
        head.kernel[...] = head.kernel[...] * 8.0
    return model, _sid(codes, sizes)


def test_add_items_joins_paths_the_decoder_writes_for_its_neighbours(small):
    model, sid = small
    old_table = np.asarray(model.item_emb.embedding[...]).copy()
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    voters = content_voters(sid, x, old_table, 6)
    ranking, scores = decoder_ranking(model, sid, voters, 8)
    assert (ranking > 0).all() and (np.diff(scores, axis=1) <= 1e-6).all(), "beams must be real and best first"

    res = add_items(model, sid, x, standardized=True, num_neighbours=5, popular_among=8, num_voters=6)
    np.testing.assert_array_equal(res.semantic_ids.codes[:41], sid.codes)  # old IDs unchanged
    table = np.asarray(model.item_emb.embedding[...])
    np.testing.assert_array_equal(table[:41], old_table)  # old embeddings unchanged
    assert model.num_items == 43 and len(np.unique(res.semantic_ids.codes[1:], axis=0)) == 43
    np.testing.assert_array_equal(res.trie.lookup(res.codes), res.item_ids)
    for i, item in enumerate(res.item_ids):
        # the code path is one of the decoder's candidates for the new item's pseudo-user ...
        cand = {tuple(sid.codes[j, :2]) for j in ranking[i]}
        assert tuple(res.codes[i, :2]) in cand, f"new item {item} joined a path the decoder does not write"
        # ... and its embedding is the mean of the first items of that ranking
        np.testing.assert_array_equal(res.neighbours[i], ranking[i, :5])
        np.testing.assert_allclose(table[item], old_table[ranking[i, :5]].mean(0), rtol=1e-6, atol=1e-6)
    # Beam search over the grown trie (uniform de-duplication level, as served) gives each new
    # item to the pseudo-user it was placed for.
    items, _ = decoder_ranking(model, res.semantic_ids, voters, 8)
    for i, item in enumerate(res.item_ids):
        assert item in items[i], f"new item {item} is not in its own pseudo-user's beams"


def test_without_embeddings_the_latent_places_items(small):
    """Serving registers items with model=None: no bridge, no probe, same contract."""
    _, sid = small
    x = np.random.default_rng(3).normal(size=(2, 6)).astype(np.float32)
    res = add_items(None, sid, x, standardized=True, num_neighbours=4)
    np.testing.assert_array_equal(res.semantic_ids.codes[:41], sid.codes)
    assert all(len(nb) == 4 and (nb > 0).all() and (nb <= 40).all() for nb in res.neighbours)
    np.testing.assert_array_equal(res.trie.lookup(res.codes), res.item_ids)


def test_without_a_decoder_embeddings_and_popularity_rank_the_paths(small):
    """A retrieval-only model: the voters' mean embedding ranks existing items; among the
    first ``popular_among`` the path maximising log(1 + pop) - log(1 + #items on it) wins."""
    model, sid = small
    emb = np.asarray(model.item_emb.embedding[...])[:41]
    pop = np.zeros(41)
    pop[1:] = np.arange(40)
    paths = {}
    for item in range(1, 41):
        paths.setdefault(tuple(sid.codes[item, :2]), []).append(item)
    gain = {p: np.log1p(pop[items].max()) - np.log1p(len(items)) for p, items in paths.items()}
    want = max(gain, key=gain.get)
    x = np.random.default_rng(4).normal(size=(2, 6)).astype(np.float32)
    res = add_items(None, sid, x, standardized=True, item_embeddings=emb, item_popularity=pop,
                    popular_among=40, num_neighbours=3)  # every item a candidate
    assert tuple(res.codes[0, :2]) == want
    assert all(len(nb) == 3 and (nb > 0).all() for nb in res.neighbours)
    np.testing.assert_array_equal(res.semantic_ids.codes[:41], sid.codes)

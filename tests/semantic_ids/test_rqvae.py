"""RQ-VAE: training lowers reconstruction and raises utilisation; every item gets a unique ID."""

import numpy as np
import pytest

from genrec_jax.config import RQVAEConfig
from genrec_jax.semantic_ids.rqvae import (
    RQVAE, collision_rate, deduplicate, encode_codes, reconstruction_error, utilisation)
from genrec_jax.semantic_ids.train_rqvae import assign_semantic_ids, train_rqvae
from genrec_jax.semantic_ids.trie import Trie


def blobs(rng, n=240, dim=12, centers=12):
    c = rng.normal(size=(centers, dim)) * 3
    return (c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = blobs(rng)
    cfg = RQVAEConfig(codebook_sizes=[8, 8], latent_dim=8, hidden_dims=[32], num_steps=150, batch_size=64,
                      learning_rate=3e-3, dead_code_every=50, log_every=25, seed=0)
    model, history = train_rqvae(x, cfg)
    return x, cfg, model, history


def test_reconstruction_falls_and_utilisation_rises(trained):
    from flax import nnx

    x, cfg, model, history = trained
    untrained = RQVAE(x.shape[1], cfg, rngs=nnx.Rngs(0))  # random codebooks, no k-means
    before_err = reconstruction_error(untrained, x)
    before_util = min(utilisation(encode_codes(untrained, x), cfg.codebook_sizes))
    after_err = reconstruction_error(model, x)
    after_util = min(utilisation(encode_codes(model, x), cfg.codebook_sizes))
    assert after_err < 0.5 * before_err, f"reconstruction did not fall: {before_err:.3f} -> {after_err:.3f}"
    assert after_util > before_util and after_util >= 0.75, f"utilisation {before_util:.2f} -> {after_util:.2f}"
    logged = [h["reconstruction"] for h in history]
    assert logged[-1] < logged[0], "logged reconstruction error should fall during training"


def test_every_item_gets_a_unique_id(trained):
    x, cfg, model, _ = trained
    table, sizes, stats = assign_semantic_ids(model, x)
    assert table.shape == (len(x) + 1, len(cfg.codebook_sizes) + 1)
    assert (table[0] == 0).all()
    assert len(np.unique(table[1:], axis=0)) == len(x), "semantic IDs are not unique"
    assert sizes[-1] >= table[:, -1].max() + 1
    Trie.from_item_codes(table, sizes)  # raises on duplicates or out-of-range codes
    assert 0.0 <= stats["collision_rate"] < 1.0


def test_deduplicate_numbers_collisions_in_row_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    out = deduplicate(codes)
    assert out[:, -1].tolist() == [0, 0, 1, 2, 0]
    assert collision_rate(codes) == pytest.approx(1 - 3 / 5)

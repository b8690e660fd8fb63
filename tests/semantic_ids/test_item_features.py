"""Item vectors for the RQ-VAE: content (synthetic, MovieLens), co-occurrence, user files."""

import numpy as np
import pytest

from genrec_jax.config import RQVAEConfig
from genrec_jax.data.types import EventSequences
from genrec_jax.semantic_ids.item_features import (
    FeatureError, cooccurrence_features, item_feature_matrix, load_feature_file, movielens_features, standardize)


def test_movielens_features_encode_genres_title_and_year():
    genres = np.zeros((4, 18), np.float32)
    genres[1, [0, 3]] = 1
    genres[2, 3] = 1
    genres[3, 7] = 1
    year = np.array([0, 1995, 1995, 1960])
    title = np.array([[0, 0], [5, 9], [5, 0], [77, 0]])
    x = movielens_features(genres, year, title)
    assert x.shape[0] == 4 and (x[0] == 0).all()
    np.testing.assert_array_equal(x[1:, :18], genres[1:])
    sim = x[1:] @ x[1:].T
    assert sim[0, 1] > sim[0, 2], "movies sharing genres and title words must be closer"


def test_cooccurrence_uses_only_the_given_events_and_groups_partners():
    # Items 1-2 and 3-4 always co-occur; 5 never appears in training.
    seqs = EventSequences.from_lists([np.array([1, 2, 1, 2]), np.array([3, 4, 3, 4]), np.array([2, 1]),
                                      np.array([4, 3])])
    x = cooccurrence_features(seqs, num_items=5, dim=4, window=1)
    assert x.shape == (6, 4)
    assert (x[5] == 0).all() and (x[0] == 0).all(), "an item without training events must stay zero"
    np.testing.assert_allclose(np.linalg.norm(x[1:5], axis=1), 1.0, rtol=1e-5)
    cos = x @ x.T
    for a in (1, 2):
        for b in (3, 4):
            assert abs(cos[a, b]) < 1e-3, "items that never co-occur must get orthogonal vectors"


def test_feature_file_and_source_dispatch(tmp_path):
    m = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "items.npy", m)
    x = load_feature_file(tmp_path / "items.npy", 5)  # [N, F]: padding row added
    assert x.shape == (6, 3) and (x[0] == 0).all()
    np.testing.assert_allclose(x[1:], m)
    with pytest.raises(FeatureError, match="N = 7"):
        load_feature_file(tmp_path / "items.npy", 7)
    from genrec_jax.data.types import Dataset

    ds = Dataset(name="nometa", sequences=EventSequences.from_lists([np.array([1, 2])]), num_items=5,
                 item_ids=np.arange(6), user_ids=np.array(["u"]))
    with pytest.raises(FeatureError, match="cooccurrence"):
        item_feature_matrix(RQVAEConfig(features="content"), ds)
    y = item_feature_matrix(RQVAEConfig(features="file", features_path=str(tmp_path / "items.npy")), ds)
    np.testing.assert_allclose(y, x)
    z, mean, std = standardize(y)
    np.testing.assert_allclose(z[1:].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(standardize(y, mean, std)[0], z)

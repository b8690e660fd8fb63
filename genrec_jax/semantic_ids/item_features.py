"""Item vectors the RQ-VAE tokenises, per data set (rows = item ids, row 0 = padding).

* ``content``: the data set's own item features. Synthetic: category one-hot, tag
  multi-hot, numeric attributes. MovieLens-1M: genre multi-hot, title words as hashed
  TF-IDF, normalised release year. (Any data set with ``ItemFeatures``: its dense matrix.)
* ``cooccurrence``: collaborative vectors for data sets without metadata (our Amazon Beauty
  copy): a truncated SVD of the positive PMI of item co-occurrences within a window of
  each user's *training* events (never the validation / test events).
* ``file``: a user's own ``.npy`` matrix, ``[N + 1, F]`` (row 0 padding) or ``[N, F]``.

Nothing is downloaded: every source is computed from the data already loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genrec_jax.config import RQVAEConfig
from genrec_jax.data.types import Dataset, EventSequences

TITLE_BUCKETS = 256  # hashed title-word TF-IDF width (MovieLens)


class FeatureError(ValueError):
    """No item vectors can be made from the requested source for this data set."""


def content_features(ds: Dataset) -> np.ndarray:
    """float32 [N + 1, F] content vectors of ``ds`` (row 0 = zeros)."""
    ex = ds.extras
    if "movie_genres" in ex:
        return movielens_features(ex["movie_genres"], ex["movie_year"], ex["title_hash"])
    if ds.item_features is not None:
        return ds.item_features.dense_matrix().astype(np.float32)
    raise FeatureError(
        f"data set {ds.name!r} has no item content features; use rqvae.features=cooccurrence "
        "(collaborative vectors from the training sequences) or rqvae.features=file with "
        "rqvae.features_path=ITEMS.npy"
    )


def movielens_features(genres: np.ndarray, year: np.ndarray, title_hash: np.ndarray) -> np.ndarray:
    """Genre multi-hot [18], title TF-IDF over hashed word buckets [256], year in [0, 1] and
    decade one-hot; row 0 stays zero."""
    n = len(genres)
    tf = np.zeros((n, TITLE_BUCKETS), np.float32)
    rows = np.repeat(np.arange(n), title_hash.shape[1])
    words = title_hash.reshape(-1)
    keep = words > 0
    np.add.at(tf, (rows[keep], words[keep] % TITLE_BUCKETS), 1.0)
    df = (tf[1:] > 0).sum(0)
    idf = np.log((n - 1 + 1) / (df + 1)) + 1.0
    tfidf = tf * idf[None, :]
    norm = np.linalg.norm(tfidf, axis=1, keepdims=True)
    tfidf = np.divide(tfidf, norm, out=np.zeros_like(tfidf), where=norm > 0)
    year = np.asarray(year, np.float64)
    known = year > 0
    y = np.zeros((n, 1), np.float32)
    decades = np.zeros((n, 12), np.float32)
    if known[1:].any():
        lo, hi = year[known].min(), year[known].max()
        y[known, 0] = (year[known] - lo) / max(hi - lo, 1)
        dec = np.clip(((year[known] - lo) // 10).astype(int), 0, 11)
        decades[np.flatnonzero(known), dec] = 1.0
    out = np.concatenate([np.asarray(genres, np.float32), tfidf, y, decades], axis=1)
    out[0] = 0.0
    return out


def cooccurrence_features(train: EventSequences, num_items: int, dim: int = 64, window: int = 3,
                          seed: int = 0) -> np.ndarray:
    """float32 [N + 1, dim]: SVD of the positive PMI of item pairs at most ``window`` events
    apart in a user's training sequence (weight 1 / distance), rows L2-normalised.

    ``train`` must hold training events only (e.g. ``leave_one_out(...).train``) so that the
    held-out events cannot leak into the semantic IDs. Items never seen in training get a
    zero vector (they share their codes with each other until de-duplication).
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    items = np.asarray(train.items, np.int64)
    offsets = np.asarray(train.offsets, np.int64)
    user_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    src, dst, w = [], [], []
    for d in range(1, window + 1):
        same = user_of[d:] == user_of[:-d]
        a, b = items[:-d][same], items[d:][same]
        src += [a, b]
        dst += [b, a]
        w += [np.full(len(a), 1.0 / d)] * 2
    n = num_items + 1
    if not src or sum(len(s) for s in src) == 0:
        return np.zeros((n, dim), np.float32)
    c = sp.coo_matrix((np.concatenate(w), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)).tocsr()
    c.sum_duplicates()
    row = np.asarray(c.sum(axis=1)).ravel()
    col = np.power(np.asarray(c.sum(axis=0)).ravel(), 0.75)  # context-distribution smoothing
    total, col_total = c.sum(), col.sum()
    coo = c.tocoo()
    pmi = np.log(coo.data * col_total / (row[coo.row] * col[coo.col] + 1e-12) + 1e-12)
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
    del total
    k = min(dim, n - 2)
    rng = np.random.default_rng(seed)
    u, s, _ = svds(ppmi.astype(np.float64), k=k, v0=rng.standard_normal(n))
    order = np.argsort(-s)
    emb = (u[:, order] * np.sqrt(s[order])[None, :]).astype(np.float32)
    if k < dim:
        emb = np.pad(emb, ((0, 0), (0, dim - k)))
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
    emb[0] = 0.0
    return emb


def load_feature_file(path: str | Path, num_items: int) -> np.ndarray:
    """A user-supplied item matrix ``[N + 1, F]`` (row 0 padding) or ``[N, F]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rqvae.features_path: {path} does not exist")
    x = np.load(path, allow_pickle=False)
    if x.ndim != 2 or len(x) not in (num_items, num_items + 1):
        raise FeatureError(f"{path}: expected a [N + 1, F] or [N, F] matrix with N = {num_items}, got {x.shape}")
    if len(x) == num_items:
        x = np.concatenate([np.zeros((1, x.shape[1]), x.dtype), x])
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise FeatureError(f"{path}: contains NaN or infinite values")
    x[0] = 0.0
    return x


def item_feature_matrix(rcfg: RQVAEConfig, ds: Dataset, train: EventSequences | None = None) -> np.ndarray:
    """The RQ-VAE's input vectors [N + 1, F] from the source ``rcfg.features`` names."""
    if rcfg.features == "content":
        return content_features(ds)
    if rcfg.features == "cooccurrence":
        if train is None:
            raise FeatureError("cooccurrence features need the training sequences")
        return cooccurrence_features(train, ds.num_items, dim=rcfg.cooccurrence_dim,
                                     window=rcfg.cooccurrence_window, seed=rcfg.seed)
    if rcfg.features == "file":
        if not rcfg.features_path:
            raise FeatureError("rqvae.features=file needs rqvae.features_path=ITEMS.npy")
        return load_feature_file(rcfg.features_path, ds.num_items)
    raise FeatureError(f"rqvae.features: unknown source {rcfg.features!r}")


def standardize(x: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """Per-column zero mean / unit variance over the real items (rows 1..N); returns
    ``(x_std, mean, std)``. Pass the saved ``mean`` / ``std`` to transform new items alike."""
    x = np.asarray(x, np.float32)
    if mean is None or std is None:
        body = x[1:] if len(x) > 1 else x
        mean = body.mean(0)
        std = body.std(0)
        std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    return ((x - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)

"""Cold start: make brand-new items recommendable without retraining the UGT.

``add_items`` takes the new items' content vectors (made exactly like the catalogue's, see
item_features), and

1. gives each one a semantic ID with the trained RQ-VAE: the RQ codes of the nearest
   existing code path (in RQ-VAE latent space) with a free de-duplication slot, plus that
   slot -- so it lands on a prefix the decoder already writes for its neighbours' users
   (the decoder's heads never change). Existing IDs are never touched;
2. appends them to the item -> code table and rebuilds the trie, so beam search can
   produce them;
3. initialises their retrieval embeddings as the mean of their nearest semantic neighbours'
   (existing items sharing the longest code prefix, nearest in RQ-VAE latent space first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from genrec_jax.semantic_ids.item_features import standardize
from genrec_jax.semantic_ids.rqvae import sq_dist
from genrec_jax.semantic_ids.train_rqvae import SemanticIDs
from genrec_jax.semantic_ids.trie import Trie


class CapacityError(ValueError):
    """No free semantic ID near a new item (every nearby de-dup slot is taken)."""


@dataclasses.dataclass
class ColdStartResult:
    item_ids: np.ndarray  # int [M]: the new items' ids (N + 1 .. N + M)
    codes: np.ndarray  # int32 [M, L + 1]: their semantic IDs
    neighbours: list[np.ndarray]  # existing items each new embedding was averaged from
    semantic_ids: SemanticIDs  # the grown table (a new object; the old one is unchanged)
    trie: Trie


def _latent_and_candidates(sid: SemanticIDs, x: np.ndarray):
    """Latent z [M, D], greedy RQ codes [M, L] and the last level's codes by distance [M, K_L]."""
    model = sid.rqvae
    z = model.encode(jnp.asarray(x))
    _, codes, res = model.quantize(z)
    last = model.codebooks[-1][...]
    order = jnp.argsort(sq_dist(res[-1], last), axis=-1)
    return np.asarray(z), np.asarray(codes).astype(np.int64), np.asarray(order)


def _quantized_latents(sid: SemanticIDs, codes: np.ndarray) -> np.ndarray:
    """Sum of codebook vectors of RQ codes [M, L] -> [M, D]."""
    out = 0.0
    for level, cb in enumerate(sid.rqvae.codebooks):
        out = out + np.asarray(cb[...])[codes[:, level]]
    return np.asarray(out)


def assign_new_codes(sid: SemanticIDs, x: np.ndarray, prefer_existing: bool = True,
                     item_popularity: np.ndarray | None = None, popular_among: int = 10
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Semantic IDs int32 [M, L + 1] for standardised content vectors ``x`` [M, F],
    unique among themselves and against ``sid.codes``; also returns their latents [M, D].

    ``prefer_existing`` (default): the RQ codes are those of the nearest existing code path
    (distance from the item's latent to the paths' quantised latents) that still has a free
    de-duplication slot, so the new item joins a prefix the decoder has learnt to write and
    differs from its nearest neighbours only at the de-duplication level. With
    ``item_popularity`` [N + 1], the path whose items are most popular among the
    ``popular_among`` nearest is tried first: the item is content-similar to all of them, and
    joining the prefix the decoder writes most often gives the new item exposure. Otherwise:
    the greedy RQ codes, moving to the next-nearest last-level code when the prefix is full.
    """
    if sid.rqvae is None:
        raise ValueError("assigning new semantic IDs needs the trained RQ-VAE (load_semantic_ids(..., with_model=True))")
    z, rq, order = _latent_and_candidates(sid, x)
    num_rq = rq.shape[1]
    dedup_size = sid.code_sizes[-1]
    taken: dict[tuple, set] = {}
    for row in sid.codes[1:]:
        taken.setdefault(tuple(int(c) for c in row[:num_rq]), set()).add(int(row[-1]))
    paths = np.array(sorted(taken), np.int64).reshape(-1, num_rq)
    path_zq = _quantized_latents(sid, paths) if len(paths) else np.zeros((0, z.shape[1]), np.float32)
    path_pop = None
    if item_popularity is not None and len(paths):
        index = {p: i for i, p in enumerate(map(tuple, paths.tolist()))}
        path_pop = np.zeros(len(paths))
        for item, row in enumerate(sid.codes[1:], start=1):
            j = index[tuple(int(c) for c in row[:num_rq])]
            path_pop[j] = max(path_pop[j], float(item_popularity[item]))
    out = np.zeros((len(rq), num_rq + 1), np.int32)
    for i, codes in enumerate(rq):
        if prefer_existing and len(paths):
            dist = np.sum(np.square(path_zq - z[i][None, :]), -1)
            order_j = np.argsort(dist, kind="stable")
            if path_pop is not None:
                near = order_j[:popular_among]
                order_j = np.concatenate([near[np.argsort(-path_pop[near], kind="stable")], order_j[popular_among:]])
            candidates = [tuple(int(c) for c in paths[j]) for j in order_j]
        else:
            head = tuple(int(c) for c in codes[:-1])
            candidates = [head + (int(last),) for last in order[i]]
        for prefix in candidates:
            used = taken.setdefault(prefix, set())
            if len(used) < dedup_size:
                free = next(d for d in range(dedup_size) if d not in used)
                used.add(free)
                out[i] = (*prefix, free)
                break
        else:
            raise CapacityError(f"new item {i}: every de-duplication slot of every candidate prefix is taken "
                                f"(de-dup level size {dedup_size}); retrain the RQ-VAE with a larger "
                                "rqvae.dedup_size")
    return out, z


def semantic_neighbours(sid: SemanticIDs, new_codes: np.ndarray, z_new: np.ndarray, num: int) -> list[np.ndarray]:
    """Up to ``num`` existing items per new one: longest shared code prefix first, then
    nearest in latent space (distance to the existing items' quantised latents)."""
    existing = sid.codes[1:].astype(np.int64)
    num_rq = len(sid.rqvae.codebooks)
    zq = _quantized_latents(sid, existing[:, :num_rq])
    out = []
    for codes, z in zip(new_codes, z_new):
        shared = np.cumprod(existing[:, :num_rq] == codes[None, :num_rq], axis=1).sum(1)  # prefix length
        dist = np.sum(np.square(zq - z[None, :]), -1)
        order = np.lexsort((dist, -shared))
        out.append(order[:num] + 1)
    return out


def add_items(model, sid: SemanticIDs, features: np.ndarray, *, num_neighbours: int = 10,
              standardized: bool = False, prefer_existing: bool = True,
              item_popularity: np.ndarray | None = None, popular_among: int = 10) -> ColdStartResult:
    """Register new items (content vectors ``features`` [M, F], raw like the catalogue's).

    ``model``: a Recommender (its item table, item code table and ``num_items`` grow in
    place; pass None to only extend the IDs and trie). ``item_popularity`` [N + 1]
    (training counts): see :func:`assign_new_codes`. Returns the new ids, codes, trie.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be [M >= 1, F], got shape {x.shape}")
    if not standardized:
        if sid.feature_mean is None:
            raise ValueError("the semantic IDs were saved without feature statistics; pass standardized=True")
        x, _, _ = standardize(x, sid.feature_mean, sid.feature_std)
    if sid.rqvae is not None and x.shape[1] != sid.rqvae.in_dim:
        raise ValueError(f"new items have {x.shape[1]} features, the RQ-VAE was trained on {sid.rqvae.in_dim}")
    new_codes, z = assign_new_codes(sid, x, prefer_existing, item_popularity, popular_among)
    n_old = sid.num_items
    ids = np.arange(n_old + 1, n_old + 1 + len(new_codes))
    table = np.concatenate([sid.codes, new_codes]).astype(np.int32)
    grown = dataclasses.replace(sid, codes=table)
    trie = Trie.from_item_codes(table, grown.code_sizes)
    neighbours = semantic_neighbours(sid, new_codes, z, num_neighbours)
    if model is not None:
        grow_model(model, table, neighbours)
    return ColdStartResult(ids, new_codes, neighbours, grown, trie)


def grow_model(model, table: np.ndarray, neighbours: list[np.ndarray]) -> None:
    """Append item-table rows (mean of each new item's neighbours' rows) and the new codes."""
    emb = np.asarray(model.item_emb.embedding[...])
    if len(emb) + len(neighbours) != len(table):
        raise ValueError(f"the model has {len(emb) - 1} items, the code table {len(table) - 1} - "
                         f"{len(neighbours)} new: they must agree")
    rows = np.stack([emb[nb].mean(0) for nb in neighbours]).astype(emb.dtype)
    model.item_emb.embedding.set_value(jnp.asarray(np.concatenate([emb, rows])))
    if getattr(model, "item_codes", None) is not None:
        model.item_codes.set_value(jnp.asarray(table, jnp.int32))
    model.num_items = len(table) - 1
    jax.block_until_ready(model.item_emb.embedding[...])

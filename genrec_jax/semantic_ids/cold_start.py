"""Cold start: make brand-new items recommendable without retraining the UGT.

``add_items`` takes the new items' content vectors (made exactly like the catalogue's, see
item_features), and

1. finds each one's *voters*: the existing items nearest to it in a content -> collaborative
   bridge fitted on the catalogue (regularised CCA between the items' content, as the
   RQ-VAE decodes it from their semantic IDs, and their trained retrieval embeddings), so
   content is compared by what predicts who consumes an item, not by raw feature overlap;
2. asks the model where such an item's users are: a pseudo-user whose history is the
   voters is encoded and beam search (uniform de-duplication level, as served) returns
   the existing items the decoder writes for them, with scores;
3. gives it a semantic ID: the RQ codes of the best of those paths -- decoder score, less
   the share of the path's exposure it has to split with the items already on it (earlier
   newcomers included) -- plus a free de-duplication slot, so it lands on a prefix the
   decoder already writes for those users (the decoder's heads never change). Existing
   IDs are never touched;
4. appends them to the item -> code table and rebuilds the trie, so beam search can
   produce them;
5. initialises their retrieval embeddings as the mean of the first items of that ranking.

Without a decoder the voters' mean embedding ranks the candidates (with popularity); without
retrieval embeddings at all (``add_items(None, sid, x)``) the RQ-VAE latent places the item:
the nearest existing code path, and embeddings from the items sharing the longest code
prefix. ``place_items`` is steps 1-4 and the embedding sources without touching the model
(the server calls it with the model it serves, then writes ``neighbour_mean`` rows into
its own padded table).
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


PROBE_GAP_SECONDS = 60  # time between a pseudo-user's events (decoder_ranking): one browsing session


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


def catalogue_content(sid: SemanticIDs, chunk: int = 8192) -> np.ndarray:
    """Standardised content vectors [N, F] of the existing items as the RQ-VAE reconstructs
    them from their semantic IDs (the catalogue's raw features are not kept with the IDs)."""
    num_rq = len(sid.rqvae.codebooks)
    codes = sid.codes[1:, :num_rq].astype(np.int64)
    out = [np.asarray(sid.rqvae.decode(jnp.asarray(_quantized_latents(sid, codes[i:i + chunk]), jnp.float32)))
           for i in range(0, len(codes), chunk)]
    return np.concatenate(out).astype(np.float32)


def _inv_sqrt(cov: np.ndarray, reg: float) -> np.ndarray:
    w, v = np.linalg.eigh(cov + reg * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov)))
    return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T


@dataclasses.dataclass
class ContentBridge:
    """Linear map from standardised content to the directions that predict the collaborative
    (retrieval) embeddings: regularised CCA between the catalogue's content and its unit
    embeddings, canonical coordinates weighted by their squared correlations so that the
    directions content barely predicts count little. Distances in this space compare items
    by the content that matters to users."""

    mean: np.ndarray  # float64 [F]
    projection: np.ndarray  # float64 [F, r]
    correlations: np.ndarray  # [r], descending

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) @ self.projection


def fit_content_bridge(content: np.ndarray, embeddings: np.ndarray, reg: float = 1e-2) -> ContentBridge:
    """CCA between ``content`` [N, F] and ``embeddings`` [N, D] (one row per existing item);
    ``reg``: ridge on each covariance, relative to its mean eigenvalue."""
    x = np.asarray(content, np.float64)
    e = np.asarray(embeddings, np.float64)
    mx, me = x.mean(0), e.mean(0)
    xc, ec = x - mx, e - me
    n = max(len(x), 1)
    wx = _inv_sqrt(xc.T @ xc / n, reg)
    we = _inv_sqrt(ec.T @ ec / n, reg)
    u, rho, _ = np.linalg.svd(wx @ (xc.T @ ec / n) @ we, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    return ContentBridge(mx, (wx @ u) * np.square(rho)[None, :], rho)


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def bridge_neighbours(content: np.ndarray, embeddings: np.ndarray, x: np.ndarray, num: int,
                      bridge: ContentBridge | None = None) -> np.ndarray:
    """Indices [M, num] (0-based rows of ``content``, nearest first) of the existing items
    nearest to each of ``x`` [M, F] in the bridge fitted on ``content`` [N, F] and
    ``embeddings`` [N, D] (unless ``bridge`` is given)."""
    if bridge is None:
        bridge = fit_content_bridge(content, _unit(embeddings))
    old = bridge(content)
    new = bridge(x)
    old_sq = np.sum(np.square(old), -1)
    num = min(num, len(old))
    out = np.zeros((len(new), num), np.int64)
    for i in range(0, len(new), 256):
        d = old_sq[None, :] - 2.0 * new[i:i + 256] @ old.T  # + |new|^2, constant per row
        out[i:i + 256] = np.argsort(d, axis=1, kind="stable")[:, :num]
    return out


def content_voters(sid: SemanticIDs, x: np.ndarray, item_embeddings: np.ndarray, num_voters: int = 20,
                   bridge: ContentBridge | None = None) -> np.ndarray:
    """The ``num_voters`` existing items [M, V] (ids, nearest first) closest to each
    standardised content vector of ``x`` [M, F] in content-bridge space, fitted on the
    catalogue's decoded content and ``item_embeddings`` [N + 1, D] (see ContentBridge)."""
    emb = np.asarray(item_embeddings)[1:sid.num_items + 1]
    return bridge_neighbours(catalogue_content(sid), emb, x, num_voters, bridge) + 1


def affinity_ranking(voters: np.ndarray, item_embeddings: np.ndarray, num: int) -> np.ndarray:
    """The ``num`` existing items [M, num] (ids, best first) whose unit retrieval embeddings
    are closest to the normalised sum of the ``voters``' [M, V]: the ranking used when the
    model has no semantic-ID decoder to ask (:func:`decoder_ranking`)."""
    emb = _unit(np.asarray(item_embeddings)[1:])
    direction = _unit(emb[voters - 1].sum(1))
    return np.argsort(-(direction @ emb.T), axis=1, kind="stable")[:, :min(num, len(emb))] + 1


def probe_batch(histories: np.ndarray, action: int = 0, gap_seconds: int = PROBE_GAP_SECONDS) -> dict[str, np.ndarray]:
    """An encoder batch of pseudo-users whose histories are ``histories`` [B, n] (item ids,
    oldest first): one session, every event the same ``action`` (0 = "view"),
    ``gap_seconds`` apart, the next one asked for after the same gap."""
    h = np.asarray(histories, np.int32)
    t = np.broadcast_to(np.arange(h.shape[1], dtype=np.int32) * gap_seconds, h.shape)
    return {"items": h, "actions": np.full(h.shape, action, np.int32), "timestamps": t,
            "query_timestamps": t + gap_seconds, "lengths": np.full(len(h), h.shape[1], np.int32)}


_PROBE_SEARCHES: list = []  # (graphdef, beam_width, k, jitted fn), most recent last


def _probe_search(graphdef, beam_width: int, k: int):
    """Jitted ``fn(state, batch, trie) -> (items, scores)`` (uniform de-duplication level),
    kept for the last few model graphs so repeated registrations do not recompile."""
    from flax import nnx

    from genrec_jax.semantic_ids.beam_search import recommend

    for g, w, kk, fn in _PROBE_SEARCHES:
        if (w, kk) == (beam_width, k) and g == graphdef:
            return fn

    @jax.jit
    def fn(state, batch, trie):
        return recommend(nnx.merge(graphdef, state), trie, batch, beam_width=beam_width, k=k,
                         uniform_last_level=True)

    _PROBE_SEARCHES.append((graphdef, beam_width, k, fn))
    del _PROBE_SEARCHES[:-4]
    return fn


def decoder_ranking(model, sid: SemanticIDs, voters: np.ndarray, k: int, *, action: int = 0,
                    chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Ask the model where a new item's users are: encode a pseudo-user whose history is the
    item's ``voters`` [M, V] (nearest last, so it weighs most) and beam-search the catalogue's
    trie as served (uniform de-duplication level). Returns the top ``k`` existing items
    [M, k] (0 = empty beam) and their scores [M, k] (log-prob of the code prefix minus
    log #items sharing it; -inf where empty)."""
    from flax import nnx

    hist = np.asarray(voters)[:, ::-1][:, -int(model.max_len):]
    width = max(k, int(getattr(model.decoder.cfg, "beam_width", k) or k))
    graphdef, state = nnx.split(model)
    fn = _probe_search(graphdef, width, k)
    trie = sid.trie()
    items, scores = [], []
    for i in range(0, len(hist), chunk):
        part = hist[i:i + chunk]
        pad = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)]) if len(hist) > chunk else part
        it, sc = fn(state, probe_batch(pad, action), trie)
        items.append(np.asarray(it)[:len(part)])
        scores.append(np.asarray(sc)[:len(part)])
    return np.concatenate(items).astype(np.int64), np.concatenate(scores).astype(np.float64)


def assign_new_codes(sid: SemanticIDs, x: np.ndarray, prefer_existing: bool = True,
                     item_popularity: np.ndarray | None = None, popular_among: int = 10,
                     preferred: np.ndarray | None = None, preferred_scores: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Semantic IDs int32 [M, L + 1] for standardised content vectors ``x`` [M, F],
    unique among themselves and against ``sid.codes``; also returns their latents [M, D].

    ``prefer_existing`` (default): the RQ codes are those of an existing item's code path
    that still has a free de-duplication slot, so the new item joins a prefix the decoder
    has learnt to write and differs from that item only at the de-duplication level.
    Candidate paths, in order:

    * ``preferred`` [M, P] (existing item ids, best first, 0 = none; e.g. from
      :func:`decoder_ranking`) with ``preferred_scores`` [M, P]: the one maximising
      ``score + log(#items on the path before) - log(1 + #items on it now)`` -- the score
      the newcomer gets under beam search's uniform de-duplication level, new items
      assigned so far included, so newcomers spread over the paths instead of diluting one;
    * ``preferred`` without scores, then the paths nearest to the item's latent (distance
      to the paths' quantised latents): with ``item_popularity`` [N + 1], the first
      ``popular_among`` of them in order of ``log(1 + pop) - log(1 + #items on the path)``
      (the item suits all of them; joining the prefix the decoder writes most often gives
      it exposure);
    * then every other path by latent distance (when the favoured ones are full).

    Without ``prefer_existing``: the greedy RQ codes, moving to the next-nearest last-level
    code when the prefix is full.
    """
    if sid.rqvae is None:
        raise ValueError("assigning new semantic IDs needs the trained RQ-VAE (load_semantic_ids(..., with_model=True))")
    z, rq, order = _latent_and_candidates(sid, x)
    num_rq = rq.shape[1]
    dedup_size = sid.code_sizes[-1]
    taken: dict[tuple, set] = {}
    for row in sid.codes[1:]:
        taken.setdefault(tuple(int(c) for c in row[:num_rq]), set()).add(int(row[-1]))
    before = {p: len(used) for p, used in taken.items()}  # items per path in the catalogue
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
            candidates = [tuple(int(c) for c in paths[j]) for j in np.argsort(dist, kind="stable")]
            if preferred is not None and preferred_scores is not None:
                best = {}  # path -> best score among the preferred items on it
                for j, sc in zip(preferred[i], preferred_scores[i]):
                    p = tuple(int(c) for c in sid.codes[int(j), :num_rq])
                    if j > 0 and np.isfinite(sc) and sc > best.get(p, -np.inf):
                        best[p] = float(sc)
                gain = {p: sc + np.log(before[p]) - np.log1p(len(taken[p])) for p, sc in best.items()}
                candidates = sorted(gain, key=lambda p: -gain[p]) + candidates
            else:
                if preferred is not None:
                    first = [tuple(int(c) for c in sid.codes[int(j), :num_rq]) for j in preferred[i] if j > 0]
                    candidates = list(dict.fromkeys(first + candidates))  # unique, order kept
                if path_pop is not None:
                    head = candidates[:popular_among]
                    gain = [np.log1p(path_pop[index[p]]) - np.log1p(len(taken[p])) for p in head]
                    order_j = np.argsort(-np.asarray(gain), kind="stable")
                    candidates = [head[j] for j in order_j] + candidates[popular_among:]
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
              item_popularity: np.ndarray | None = None, popular_among: int = 10,
              item_embeddings: np.ndarray | None = None, num_voters: int = 20,
              probe_action: int = 0) -> ColdStartResult:
    """Register new items (content vectors ``features`` [M, F], raw like the catalogue's).

    ``model``: a Recommender (its item table, item code table and ``num_items`` grow in
    place; pass None to only extend the IDs and trie). With the existing items' retrieval
    embeddings -- ``item_embeddings`` [N + 1, D], else the model's item table -- each new
    item's ``num_voters`` nearest existing items in content-bridge space
    (:func:`content_voters`) stand in for its future users' histories: with the model's
    semantic-ID decoder, the top ``max(popular_among, num_neighbours)`` items beam search
    gives that pseudo-user (:func:`decoder_ranking`) are the candidate paths (ranked by
    decoder score; the pseudo-user's events all carry action ``probe_action``, see
    :func:`probe_batch`) and the first ``num_neighbours`` the embedding sources; without a decoder,
    the items nearest the voters' mean embedding (:func:`affinity_ranking`, ranked by
    ``item_popularity`` when given). With no embeddings at all, the RQ-VAE latent alone places
    the item (see :func:`assign_new_codes`, :func:`semantic_neighbours`). Returns the new
    ids, codes, the existing items each new embedding is averaged from, and the trie.
    (:func:`place_items` then :func:`grow_model`.)
    """
    res = place_items(model, sid, features, num_neighbours=num_neighbours, standardized=standardized,
                      prefer_existing=prefer_existing, item_popularity=item_popularity,
                      popular_among=popular_among, item_embeddings=item_embeddings, num_voters=num_voters,
                      probe_action=probe_action)
    if model is not None:
        grow_model(model, res.semantic_ids.codes, res.neighbours)
    return res


def place_items(model, sid: SemanticIDs, features: np.ndarray, *, num_neighbours: int = 10,
                standardized: bool = False, prefer_existing: bool = True,
                item_popularity: np.ndarray | None = None, popular_among: int = 10,
                item_embeddings: np.ndarray | None = None, num_voters: int = 20,
                probe_action: int = 0) -> ColdStartResult:
    """:func:`add_items` without growing the model: the new items' semantic IDs, grown IDs
    and trie, and the existing items each new embedding is to be averaged from
    (:func:`neighbour_mean`). ``model`` is only read: its item table when
    ``item_embeddings`` is None, and its encoder and decoder for the pseudo-user, whose
    history holds items of ``sid`` only (rows of the item table past ``sid.num_items``,
    e.g. padding for capacity, are never read). The server calls this with the model it
    serves."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be [M >= 1, F], got shape {x.shape}")
    if not standardized:
        if sid.feature_mean is None:
            raise ValueError("the semantic IDs were saved without feature statistics; pass standardized=True")
        x, _, _ = standardize(x, sid.feature_mean, sid.feature_std)
    if sid.rqvae is not None and x.shape[1] != sid.rqvae.in_dim:
        raise ValueError(f"new items have {x.shape[1]} features, the RQ-VAE was trained on {sid.rqvae.in_dim}")
    emb = item_embeddings
    if emb is None and model is not None:
        emb = np.asarray(model.item_emb.embedding[...])
    ranking = scores = None
    if emb is not None and sid.rqvae is not None and prefer_existing:
        emb = np.asarray(emb, np.float32)[:sid.num_items + 1]
        if len(emb) < sid.num_items + 1:
            raise ValueError(f"item_embeddings has {len(emb)} rows; the catalogue needs {sid.num_items + 1}")
        voters = content_voters(sid, x, emb, num_voters)
        num = max(popular_among, num_neighbours)
        if model is not None and getattr(model, "decoder", None) is not None:
            ranking, scores = decoder_ranking(model, sid, voters, num, action=probe_action)
        else:
            ranking = affinity_ranking(voters, emb, num)
    new_codes, z = assign_new_codes(sid, x, prefer_existing, item_popularity, popular_among,
                                    preferred=ranking, preferred_scores=scores)
    n_old = sid.num_items
    ids = np.arange(n_old + 1, n_old + 1 + len(new_codes))
    table = np.concatenate([sid.codes, new_codes]).astype(np.int32)
    grown = dataclasses.replace(sid, codes=table)
    trie = Trie.from_item_codes(table, grown.code_sizes)
    neighbours = semantic_neighbours(sid, new_codes, z, num_neighbours)
    if ranking is not None:  # the collaborative ranking where it has items (beams can come back empty)
        neighbours = [r[r > 0][:num_neighbours] if (r > 0).any() else nb for r, nb in zip(ranking, neighbours)]
    return ColdStartResult(ids, new_codes, neighbours, grown, trie)


def neighbour_mean(item_embeddings: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
    """New items' retrieval embeddings [M, D] (dtype of ``item_embeddings``): the mean of
    each one's ``neighbours``' rows of ``item_embeddings`` [N + 1, D]."""
    emb = np.asarray(item_embeddings)
    return np.stack([emb[nb].mean(0) for nb in neighbours]).astype(emb.dtype)


def grow_model(model, table: np.ndarray, neighbours: list[np.ndarray]) -> None:
    """Append item-table rows (mean of each new item's neighbours' rows) and the new codes."""
    emb = np.asarray(model.item_emb.embedding[...])
    if len(emb) + len(neighbours) != len(table):
        raise ValueError(f"the model has {len(emb) - 1} items, the code table {len(table) - 1} - "
                         f"{len(neighbours)} new: they must agree")
    rows = neighbour_mean(emb, neighbours)
    model.item_emb.embedding.set_value(jnp.asarray(np.concatenate([emb, rows])))
    if getattr(model, "item_codes", None) is not None:
        model.item_codes.set_value(jnp.asarray(table, jnp.int32))
    model.num_items = len(table) - 1
    jax.block_until_ready(model.item_emb.embedding[...])

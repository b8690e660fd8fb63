"""Synthetic interaction data with planted, learnable structure.

The generator exists so that tests and smoke runs can check that a model actually learns
something: a trained sequential model must beat item popularity by a wide margin here.
What is planted:

  * taste clusters: every user has a main cluster (and half of them a secondary one),
    every item belongs to one cluster;
  * power-law popularity: a Zipf law over a random ranking of the whole catalogue;
  * content features that follow the cluster: category, tag tokens and numeric attributes
    are drawn from cluster-conditional distributions (so content alone carries signal,
    which cold-start tests rely on);
  * first-order Markov transitions: every item has a short ordered list of likely
    successors, mostly in its own cluster; with probability ``markov_weight`` the next
    item is one of them;
  * drift: with probability ``1 - cluster_stickiness`` per step a user's current cluster
    is re-drawn from their preference (mostly the main cluster, then the secondary one,
    rarely any other), and the next item comes from that cluster;
  * actions and watch ratio depend on how well the item matches the user's taste;
  * sessions: seconds-to-minutes gaps inside a session, hours-to-days between sessions.

Everything is drawn from one ``np.random.default_rng(seed)`` in a fixed order, so equal
seeds give identical arrays. The walk is vectorised over users (one loop over positions).
"""

from __future__ import annotations

import numpy as np

from genrec_jax.data.types import ACTIONS, Dataset, EventSequences, ItemFeatures

# Successor lists: length and the probability of taking the k-th successor on a Markov
# step. Decreasing weights make the first successor the single best guess.
_NUM_SUCCESSORS = 4
_SUCCESSOR_WEIGHTS = np.array([0.5, 0.25, 0.15, 0.10])
# Share of successor slots that point outside the item's cluster (before sampling without
# replacement); keeps transitions mostly within the cluster but not exclusively.
_SUCCESSOR_OTHER_CLUSTER_SHARE = 0.15
# Successors favour popular items, but tempered so that the chain stays predictable
# from the previous item rather than collapsing onto the head of the catalogue.
_SUCCESSOR_POPULARITY_POWER = 0.3

# User preference over clusters (drift targets and taste match).
_MAIN_ONLY_WEIGHT = 0.9
_MAIN_WEIGHT, _SECONDARY_WEIGHT = 0.65, 0.25
_SECONDARY_CLUSTER_PROB = 0.5
# Taste match of an item in the user's main / secondary / any other cluster.
_MATCH_MAIN, _MATCH_SECONDARY = 1.0, 0.6

# Content feature distributions.
_CATEGORY_DIRICHLET = 0.3  # < 1: each cluster concentrates on a few categories
_PREFERRED_TAGS_PER_CLUSTER = 8
_TAG_FROM_CLUSTER_PROB = 0.8
_NUMERIC_NOISE = 0.5
_USER_FEATURE_NOISE = 0.5

# Action probabilities (order of ACTIONS: view, like, share, skip, purchase) for an item
# that matches the user's taste perfectly and for one that does not match at all.
_ACTION_PROBS_MATCH = np.array([0.45, 0.25, 0.07, 0.08, 0.15])
_ACTION_PROBS_MISMATCH = np.array([0.45, 0.05, 0.01, 0.45, 0.04])
_SKIP = ACTIONS.index("skip")

# Timestamps: share of events that open a new session, and log-normal gap parameters.
_NEW_SESSION_PROB = 0.15
_IN_SESSION_GAP = (np.log(60.0), 1.0)  # median one minute
_BETWEEN_SESSION_GAP = (np.log(8 * 3600.0), 1.2)  # median eight hours
_MIN_SESSION_GAP = 1800  # seconds; a shorter gap would not read as a new session
_FIRST_EVENT_SPREAD = 60 * 86400  # users start within two months of start_time


def generate_synthetic(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    num_clusters: int = 10,
    num_categories: int = 20,
    num_tags: int = 64,
    tags_per_item: int = 4,
    num_numeric: int = 4,
    min_len: int = 8,
    max_len: int = 60,
    zipf_exponent: float = 1.1,
    markov_weight: float = 0.6,
    cluster_stickiness: float = 0.9,
    user_feature_dim: int = 16,
    seed: int = 0,
    start_time: int = 1_600_000_000,
) -> Dataset:
    """A synthetic data set with planted cluster, popularity and Markov structure."""
    _check_arguments(num_users, num_items, num_clusters, num_categories, num_tags, tags_per_item, min_len, max_len)
    rng = np.random.default_rng(seed)

    item_cluster = _assign_item_clusters(rng, num_items, num_clusters)
    popularity = _zipf_popularity(rng, num_items, zipf_exponent)
    feature_dists = _cluster_feature_distributions(rng, num_clusters, num_categories, num_tags, num_numeric)
    item_features = _sample_item_features(rng, item_cluster, feature_dists, tags_per_item)
    successors = _build_successors(rng, item_cluster, popularity, num_clusters)

    main, secondary, preference = _user_clusters(rng, num_users, num_clusters)
    user_centroids = rng.normal(size=(num_clusters, user_feature_dim))
    user_features = (
        user_centroids[main] + _USER_FEATURE_NOISE * rng.normal(size=(num_users, user_feature_dim))
    ).astype(np.float32)

    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    items, walk_cluster = _walk(
        rng, lengths, item_cluster, popularity, successors, preference, main, markov_weight, cluster_stickiness
    )
    match = _taste_match(rng, items, item_cluster, main, secondary)
    actions, watch = _actions_and_watch_ratio(rng, match)
    timestamps = _timestamps(rng, num_users, int(lengths.max()), start_time)

    mask = np.arange(items.shape[1])[None, :] < lengths[:, None]  # row-major = user by user
    sequences = EventSequences(
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        items=items[mask],
        actions=actions[mask],
        timestamps=timestamps[mask],
        watch_ratio=watch[mask],
        user_index=np.arange(num_users),
    )
    return Dataset(
        name="synthetic",
        sequences=sequences,
        num_items=num_items,
        item_ids=np.array(["<pad>"] + [f"i{i}" for i in range(1, num_items + 1)], dtype=object),
        user_ids=np.array([f"u{u}" for u in range(num_users)], dtype=object),
        action_names=ACTIONS,
        item_features=item_features,
        user_features=user_features,
        has_timestamps=True,
        extras={
            "user_cluster": main,
            "user_secondary_cluster": secondary,  # -1 where the user has none
            "item_cluster": item_cluster,
            "successors": successors,
            "item_popularity_weight": popularity,  # planted (not observed) popularity, row 0 = 0
            # The latent state of the walk, for next_item_probabilities: the user's current
            # cluster when each event was drawn (aligned with sequences.items), the users'
            # preference over clusters, and the walk's parameters.
            "event_cluster": walk_cluster[mask],
            "user_preference": preference,
            "markov_weight": float(markov_weight),
            "cluster_stickiness": float(cluster_stickiness),
            # What generate_cold_start_items needs to draw more items like these.
            "cluster_category_probs": feature_dists["category"],
            "cluster_tag_probs": feature_dists["tag"],
            "cluster_numeric_centroids": feature_dists["numeric"],
            "tags_per_item": tags_per_item,
        },
    )


def generate_cold_start_items(dataset: Dataset, num_new: int, seed: int) -> tuple[ItemFeatures, np.ndarray]:
    """Features of ``num_new`` unseen items drawn like the catalogue's items.

    Returns ``(features, item_cluster)`` indexed like a catalogue of its own: row 0 is
    padding (cluster -1), rows ``1..num_new`` are the new items.
    """
    extras = dataset.extras
    needed = ("cluster_category_probs", "cluster_tag_probs", "cluster_numeric_centroids", "tags_per_item")
    if any(key not in extras for key in needed):
        raise ValueError("generate_cold_start_items needs a data set made by generate_synthetic")
    rng = np.random.default_rng(seed)
    dists = {
        "category": extras["cluster_category_probs"],
        "tag": extras["cluster_tag_probs"],
        "numeric": extras["cluster_numeric_centroids"],
    }
    num_clusters = len(dists["category"])
    item_cluster = np.concatenate([[-1], rng.integers(0, num_clusters, size=num_new)]).astype(np.int64)
    return _sample_item_features(rng, item_cluster, dists, int(extras["tags_per_item"])), item_cluster


def _check_arguments(num_users, num_items, num_clusters, num_categories, num_tags, tags_per_item, min_len, max_len):
    if num_users < 1 or num_clusters < 1 or num_categories < 1:
        raise ValueError("num_users, num_clusters and num_categories must be >= 1")
    if num_items < max(2, num_clusters):
        raise ValueError(f"num_items ({num_items}) must be >= 2 and >= num_clusters ({num_clusters})")
    if not 1 <= tags_per_item <= num_tags:
        raise ValueError(f"tags_per_item ({tags_per_item}) must be in 1..num_tags ({num_tags})")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len ({min_len}) <= max_len ({max_len})")


def _assign_item_clusters(rng: np.random.Generator, num_items: int, num_clusters: int) -> np.ndarray:
    """Cluster per item id (row 0 = -1); balanced sizes so every cluster has items."""
    clusters = rng.permutation(np.arange(num_items) % num_clusters)
    return np.concatenate([[-1], clusters]).astype(np.int64)


def _zipf_popularity(rng: np.random.Generator, num_items: int, exponent: float) -> np.ndarray:
    """Zipf weights over a random ranking of the catalogue (row 0 = 0)."""
    ranks = rng.permutation(num_items) + 1
    return np.concatenate([[0.0], ranks.astype(np.float64) ** -exponent])


def _cluster_feature_distributions(
    rng: np.random.Generator, num_clusters: int, num_categories: int, num_tags: int, num_numeric: int
) -> dict[str, np.ndarray]:
    """Per cluster: a distribution over categories, one over tags, a numeric centroid."""
    category = rng.dirichlet(np.full(num_categories, _CATEGORY_DIRICHLET), size=num_clusters)
    tag = np.full((num_clusters, num_tags), (1 - _TAG_FROM_CLUSTER_PROB) / num_tags)
    num_preferred = min(_PREFERRED_TAGS_PER_CLUSTER, num_tags)
    for c in range(num_clusters):
        preferred = rng.choice(num_tags, size=num_preferred, replace=False)
        tag[c, preferred] += _TAG_FROM_CLUSTER_PROB / num_preferred
    numeric = rng.normal(size=(num_clusters, num_numeric))
    return {"category": category, "tag": tag, "numeric": numeric}


def _sample_item_features(
    rng: np.random.Generator, item_cluster: np.ndarray, dists: dict[str, np.ndarray], tags_per_item: int
) -> ItemFeatures:
    """Content features for items with the given clusters (row 0 is padding)."""
    n = len(item_cluster)
    num_categories = dists["category"].shape[1]
    num_tags = dists["tag"].shape[1]
    category = np.zeros(n, np.int32)
    tags = np.zeros((n, tags_per_item), np.int32)
    numeric = np.zeros((n, dists["numeric"].shape[1]), np.float32)
    clusters = item_cluster[1:]
    # Categories by inverse CDF, vectorised over items.
    cdf = np.cumsum(dists["category"][clusters], axis=1)
    category[1:] = 1 + (cdf < rng.random(n - 1)[:, None] * cdf[:, -1:]).sum(axis=1)
    # Tags: a variable number (at least half of tags_per_item), distinct, sorted, 0-padded.
    counts = rng.integers(max(1, tags_per_item // 2), tags_per_item + 1, size=n - 1)
    for row, (c, k) in enumerate(zip(clusters, counts), start=1):
        tags[row, :k] = np.sort(rng.choice(num_tags, size=k, replace=False, p=dists["tag"][c])) + 1
    numeric[1:] = dists["numeric"][clusters] + _NUMERIC_NOISE * rng.normal(size=(n - 1, numeric.shape[1]))
    return ItemFeatures(category=category, tags=tags, numeric=numeric, num_categories=num_categories, num_tags=num_tags)


def _build_successors(
    rng: np.random.Generator, item_cluster: np.ndarray, popularity: np.ndarray, num_clusters: int
) -> np.ndarray:
    """Ordered successor lists [N + 1, S] (row 0 = 0), sampled without replacement.

    Uses the Gumbel top-k trick on log weights, so each row is a weighted sample without
    replacement in order of draw; rows are done in chunks to bound memory.
    """
    num_items = len(item_cluster) - 1
    s = min(_NUM_SUCCESSORS, num_items - 1)
    # Relative weight of an other-cluster item so that about the target share of the
    # successor mass falls outside the cluster (there are C - 1 other clusters).
    other = _SUCCESSOR_OTHER_CLUSTER_SHARE / (1 - _SUCCESSOR_OTHER_CLUSTER_SHARE) / max(num_clusters - 1, 1)
    log_pop = np.log(popularity[1:]) * _SUCCESSOR_POPULARITY_POWER
    clusters = item_cluster[1:]
    out = np.zeros((num_items + 1, _NUM_SUCCESSORS), np.int64)
    chunk = max(1, 2**22 // num_items)
    for lo in range(0, num_items, chunk):
        rows = np.arange(lo, min(lo + chunk, num_items))
        scores = log_pop[None, :] + rng.gumbel(size=(len(rows), num_items))
        scores += np.where(clusters[rows, None] == clusters[None, :], 0.0, np.log(other))
        scores[np.arange(len(rows)), rows] = -np.inf  # never its own successor
        top = np.argpartition(-scores, s - 1, axis=1)[:, :s]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[rows + 1, :s] = np.take_along_axis(top, order, axis=1) + 1
    if s < _NUM_SUCCESSORS:  # tiny catalogues: repeat the list to fill every slot
        out[1:, s:] = out[1:, np.arange(s, _NUM_SUCCESSORS) % s]
    return out


def _user_clusters(
    rng: np.random.Generator, num_users: int, num_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Main cluster, secondary cluster (-1 = none) and preference over clusters per user."""
    main = rng.integers(0, num_clusters, size=num_users)
    has_secondary = (rng.random(num_users) < _SECONDARY_CLUSTER_PROB) & (num_clusters > 1)
    shift = rng.integers(1, max(num_clusters, 2), size=num_users)
    secondary = np.where(has_secondary, (main + shift) % num_clusters, -1)
    users = np.arange(num_users)
    if num_clusters == 1:
        return main, secondary, np.ones((num_users, 1))
    rest = np.where(has_secondary, 1 - _MAIN_WEIGHT - _SECONDARY_WEIGHT, 1 - _MAIN_ONLY_WEIGHT)
    num_rest = np.where(has_secondary, num_clusters - 2, num_clusters - 1)
    preference = np.repeat((rest / np.maximum(num_rest, 1))[:, None], num_clusters, axis=1)
    preference[users, main] = np.where(has_secondary, _MAIN_WEIGHT, _MAIN_ONLY_WEIGHT)
    preference[users[has_secondary], secondary[has_secondary]] = _SECONDARY_WEIGHT
    return main, secondary, preference / preference.sum(axis=1, keepdims=True)


def _walk(
    rng: np.random.Generator,
    lengths: np.ndarray,
    item_cluster: np.ndarray,
    popularity: np.ndarray,
    successors: np.ndarray,
    preference: np.ndarray,
    main: np.ndarray,
    markov_weight: float,
    stickiness: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Item ids [U, max_len] and the current cluster each was drawn under [U, max_len]
    (positions past a user's length are filled but unused)."""
    num_users, num_clusters = preference.shape
    max_len = int(lengths.max())
    members, cdf = _cluster_popularity_tables(item_cluster, popularity, num_clusters)
    successor_cdf = np.cumsum(_SUCCESSOR_WEIGHTS)
    successor_cdf /= successor_cdf[-1]
    preference_cdf = np.cumsum(preference, axis=1)
    preference_cdf[:, -1] = 1.0  # exact, so u < 1 always lands on a real cluster

    # All randomness drawn up front, in a fixed order, for determinism and speed.
    u_drift, u_markov, u_pick, u_cluster = rng.random((4, num_users, max_len))
    current = main.copy()
    items = np.zeros((num_users, max_len), np.int64)
    clusters = np.zeros((num_users, max_len), np.int64)
    clusters[:, 0] = current
    items[:, 0] = _draw_from_clusters(members, cdf, current, u_pick[:, 0])
    for t in range(1, max_len):
        # Re-draw the current cluster from the user's preference: the cluster then follows a
        # sticky chain whose long-run distribution is the preference itself.
        drift = u_drift[:, t] > stickiness
        current = np.where(drift, (preference_cdf < u_cluster[:, t, None]).sum(axis=1), current)
        markov = ~drift & (u_markov[:, t] < markov_weight)
        slot = np.minimum(np.searchsorted(successor_cdf, u_pick[:, t], side="right"), _NUM_SUCCESSORS - 1)
        from_successors = successors[items[:, t - 1], slot]
        from_cluster = _draw_from_clusters(members, cdf, current, u_pick[:, t])
        items[:, t] = np.where(markov, from_successors, from_cluster)
        clusters[:, t] = current
    return items, clusters


def next_item_probabilities(
    dataset: Dataset, users: np.ndarray, prev_items: np.ndarray, clusters: np.ndarray
) -> np.ndarray:
    """The walk's exact next-item distribution, float64 [n, num_items + 1] (column 0 = 0).

    Row r is P(next item | user ``users[r]``, previous item ``prev_items[r]``, current cluster
    ``clusters[r]`` when that item was drawn), as ``_walk`` draws it: with probability
    1 - stickiness the cluster is re-drawn from the user's preference and the item comes from
    it by popularity; otherwise, with probability ``markov_weight``, the item is the previous
    one's k-th successor (weights ``_SUCCESSOR_WEIGHTS``), else a popularity draw from the
    current cluster. Knowing the generator's parameters and latent cluster, ranking by this
    is the best any recommender can do on the data (the Bayes ceiling of HR@k). Passing the
    previous item's own cluster instead needs no latent state; it is a strong rule, not a
    bound (the best rule without the latent state would average over its posterior).
    """
    ex = dataset.extras
    needed = ("item_cluster", "successors", "item_popularity_weight", "user_preference", "markov_weight",
              "cluster_stickiness")
    if any(key not in ex for key in needed):
        raise ValueError("next_item_probabilities needs a data set made by generate_synthetic")
    users, prev_items, clusters = (np.asarray(a, np.int64) for a in (users, prev_items, clusters))
    if not users.shape == prev_items.shape == clusters.shape or users.ndim != 1:
        raise ValueError("users, prev_items and clusters must be 1-D arrays of one length")
    item_cluster, popularity = ex["item_cluster"], ex["item_popularity_weight"]
    preference = ex["user_preference"]
    num_clusters = preference.shape[1]
    if clusters.size and (clusters.min() < 0 or clusters.max() >= num_clusters):
        raise ValueError(f"clusters must lie in 0..{num_clusters - 1}")
    # Popularity draw from each cluster: [C, N + 1].
    in_cluster = item_cluster[None, :] == np.arange(num_clusters)[:, None]
    from_cluster = np.where(in_cluster, popularity[None, :], 0.0)
    from_cluster /= from_cluster.sum(axis=1, keepdims=True)
    stay, markov = ex["cluster_stickiness"], ex["markov_weight"]
    probs = (1 - stay) * preference[users] @ from_cluster + stay * (1 - markov) * from_cluster[clusters]
    successors = ex["successors"][prev_items]  # [n, S]
    rows = np.repeat(np.arange(len(users)), successors.shape[1])
    np.add.at(probs, (rows, successors.ravel()), np.tile(stay * markov * _SUCCESSOR_WEIGHTS, len(users)))
    return probs


def _cluster_popularity_tables(
    item_cluster: np.ndarray, popularity: np.ndarray, num_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Padded member lists [C, M] and popularity CDFs [C, M] (padding CDF = 2, never hit)."""
    groups = [np.flatnonzero(item_cluster == c) for c in range(num_clusters)]
    width = max(len(g) for g in groups)
    members = np.zeros((num_clusters, width), np.int64)
    cdf = np.full((num_clusters, width), 2.0)
    for c, g in enumerate(groups):
        members[c, : len(g)] = g
        w = np.cumsum(popularity[g])
        cdf[c, : len(g)] = w / w[-1]
        cdf[c, len(g) - 1] = 1.0  # exact, so u < 1 always lands on a real member
    return members, cdf


def _draw_from_clusters(members: np.ndarray, cdf: np.ndarray, clusters: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One popularity-weighted item per row from the row's cluster (inverse CDF)."""
    index = (cdf[clusters] < u[:, None]).sum(axis=1)
    return members[clusters, index]


def _taste_match(
    rng: np.random.Generator, items: np.ndarray, item_cluster: np.ndarray, main: np.ndarray, secondary: np.ndarray
) -> np.ndarray:
    """How well each event's item fits the user, in [0, 1], with a little noise."""
    cluster = item_cluster[items]
    match = np.where(
        cluster == main[:, None], _MATCH_MAIN, np.where(cluster == secondary[:, None], _MATCH_SECONDARY, 0.0)
    )
    return np.clip(match + 0.15 * rng.normal(size=items.shape), 0.0, 1.0)


def _actions_and_watch_ratio(rng: np.random.Generator, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Action ids and watch ratios; both get better the better the match."""
    probs = match[..., None] * _ACTION_PROBS_MATCH + (1 - match[..., None]) * _ACTION_PROBS_MISMATCH
    cdf = np.cumsum(probs, axis=-1)
    actions = np.minimum((cdf < rng.random(match.shape)[..., None] * cdf[..., -1:]).sum(axis=-1), len(ACTIONS) - 1)
    engaged = rng.beta(1.0 + 4.0 * match, 2.0)
    skipped = rng.uniform(0.0, 0.15, size=match.shape)
    watch = np.where(actions == _SKIP, skipped, engaged)
    return actions.astype(np.int32), np.clip(watch, 0.0, 1.0).astype(np.float32)


def _timestamps(rng: np.random.Generator, num_users: int, max_len: int, start_time: int) -> np.ndarray:
    """Session-structured, non-decreasing int64 seconds [U, max_len]."""
    new_session = rng.random((num_users, max_len)) < _NEW_SESSION_PROB
    short = rng.lognormal(*_IN_SESSION_GAP, size=(num_users, max_len))
    long = np.maximum(rng.lognormal(*_BETWEEN_SESSION_GAP, size=(num_users, max_len)), _MIN_SESSION_GAP)
    gaps = np.where(new_session, long, short).round().astype(np.int64)
    gaps[:, 0] = rng.integers(0, _FIRST_EVENT_SPREAD, size=num_users)
    return start_time + np.cumsum(gaps, axis=1)

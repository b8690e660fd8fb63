"""The synthetic generator: determinism, validity, and the structure it promises to plant."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genrec_jax.data.synthetic import generate_cold_start_items, generate_synthetic, next_item_probabilities
from genrec_jax.data.types import ACTIONS, Dataset


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate_synthetic(seed=0)


def _arrays(ds: Dataset) -> dict[str, np.ndarray]:
    """Every array in a data set, by name, for whole-data-set comparisons."""
    out = {f"seq.{f.name}": getattr(ds.sequences, f.name) for f in dataclasses.fields(ds.sequences)}
    feats = ds.item_features
    out.update({f"item.{n}": getattr(feats, n) for n in ("category", "tags", "numeric")})
    out["user_features"] = ds.user_features
    out.update({f"extras.{k}": np.asarray(v) for k, v in ds.extras.items()})
    return out


def _check_valid(ds: Dataset, *, min_len: int, max_len: int, start_time: int) -> None:
    seqs = ds.sequences
    assert seqs.items.dtype == np.int32 and seqs.timestamps.dtype == np.int64
    assert seqs.actions.dtype == np.int32 and seqs.watch_ratio.dtype == np.float32
    assert len(seqs) == ds.num_users == len(ds.user_ids) == len(ds.user_features)
    assert seqs.items.min() >= 1 and seqs.items.max() <= ds.num_items
    assert seqs.lengths.min() >= min_len and seqs.lengths.max() <= max_len
    assert seqs.actions.min() >= 0 and seqs.actions.max() < len(ACTIONS)
    assert np.all((seqs.watch_ratio >= 0) & (seqs.watch_ratio <= 1))
    assert seqs.timestamps.min() >= start_time
    # Non-decreasing within each user; only the first event of a user may go backwards.
    steps = np.diff(seqs.timestamps)
    user_start = np.zeros(seqs.num_events, bool)
    user_start[seqs.offsets[:-1]] = True
    assert np.all(steps[~user_start[1:]] >= 0)
    feats = ds.item_features
    assert len(feats.category) == len(feats.tags) == len(feats.numeric) == ds.num_items + 1
    assert feats.category[0] == 0 and not feats.tags[0].any() and not feats.numeric[0].any()
    assert feats.category[1:].min() >= 1 and feats.category.max() <= feats.num_categories
    assert feats.tags.max() <= feats.num_tags and (feats.tags[1:, 0] >= 1).all()
    assert ds.extras["item_cluster"][0] == -1 and ds.extras["item_cluster"][1:].min() >= 0
    succ = ds.extras["successors"]
    assert succ.shape[0] == ds.num_items + 1 and not succ[0].any()
    assert succ[1:].min() >= 1 and succ.max() <= ds.num_items
    assert ds.extras["event_cluster"].shape == seqs.items.shape
    # The walk's next-item distribution is one wherever the walk went (any size of catalogue,
    # one cluster or many), and gives every drawn item positive probability.
    users, prev, clusters, nxt = _next_events(ds)
    probs = next_item_probabilities(ds, users, prev, clusters)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (probs[np.arange(len(nxt)), nxt] > 0).all()


def test_shapes_dtypes_and_ranges(data: Dataset) -> None:
    assert data.name == "synthetic" and data.has_timestamps
    assert data.num_items == 1000 and data.num_users == 2000
    assert data.item_ids[0] == "<pad>" and data.item_ids[1] == "i1" and data.item_ids[-1] == "i1000"
    assert data.user_ids[0] == "u0" and data.user_ids.dtype == object
    assert data.user_features.shape == (2000, 16) and data.user_features.dtype == np.float32
    assert data.item_features.tags.shape == (1001, 4) and data.item_features.numeric.shape == (1001, 4)
    assert data.extras["user_cluster"].shape == (2000,)
    _check_valid(data, min_len=8, max_len=60, start_time=1_600_000_000)
    # Successors never point at the item itself.
    succ = data.extras["successors"]
    assert not (succ[1:] == np.arange(1, 1001)[:, None]).any()


def test_same_seed_same_data_other_seed_other_data(data: Dataset) -> None:
    again, other = _arrays(generate_synthetic(seed=0)), _arrays(generate_synthetic(seed=1))
    for name, value in _arrays(data).items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
    assert not np.array_equal(data.sequences.items[:1000], other["seq.items"][:1000])
    assert not np.array_equal(data.user_features, other["user_features"])


def test_generation_is_fast() -> None:
    import time

    start = time.perf_counter()
    generate_synthetic(seed=3)
    assert time.perf_counter() - start < 2.0


def test_popularity_is_heavy_tailed(data: Dataset) -> None:
    counts = np.sort(data.item_popularity()[1:])[::-1]
    top_share = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.35, top_share  # uniform would give 0.10
    assert counts[0] > 20 * np.median(counts)


def _next_item_hit_rates(data: Dataset, k: int = 10) -> tuple[float, float]:
    """HR@k of popularity and of first-order transition counts, 80/20 split per user."""
    n = data.num_items
    transitions = np.zeros((n + 1, n + 1), np.int64)
    popularity = np.zeros(n + 1, np.int64)
    prev, target = [], []
    for u in range(len(data.sequences)):
        items = data.sequences.row(u)["items"]
        cut = int(0.8 * len(items))
        train = items[:cut]
        popularity += np.bincount(train, minlength=n + 1)
        np.add.at(transitions, (train[:-1], train[1:]), 1)
        prev.extend(items[cut - 1 : -1])
        target.extend(items[cut:])
    prev, target = np.array(prev), np.array(target)
    popularity[0] = -1
    top_popular = np.argsort(-popularity, kind="stable")[:k]
    hr_popularity = np.isin(target, top_popular).mean()
    # Transition counts, ties (and unseen predecessors) broken by popularity.
    scores = transitions[prev] + popularity[None, :] / (popularity.max() + 1.0)
    scores[:, 0] = -np.inf
    top_next = np.argpartition(-scores, k, axis=1)[:, :k]
    hr_markov = (top_next == target[:, None]).any(axis=1).mean()
    return float(hr_popularity), float(hr_markov)


def test_next_item_is_predictable_from_last_item(data: Dataset) -> None:
    hr_popularity, hr_markov = _next_item_hit_rates(data)
    assert hr_markov >= 3 * hr_popularity, (hr_markov, hr_popularity)
    assert hr_markov > 0.5


def test_successors_mostly_stay_in_cluster(data: Dataset) -> None:
    cluster = data.extras["item_cluster"]
    same = cluster[data.extras["successors"][1:]] == cluster[1:, None]
    assert 0.7 < same.mean() < 1.0


def test_users_mostly_consume_their_cluster(data: Dataset) -> None:
    seqs = data.sequences
    users = np.repeat(np.arange(len(seqs)), seqs.lengths)
    in_main = data.extras["item_cluster"][seqs.items] == data.extras["user_cluster"][users]
    assert in_main.mean() > 0.5  # 10 clusters: chance would be 0.1


def _nearest_centroid_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    centroids = np.stack([x[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    predicted = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((predicted == labels).mean())


def test_features_carry_the_clusters(data: Dataset) -> None:
    item_cluster = data.extras["item_cluster"][1:]
    dense = data.item_features.dense_matrix()[1:]
    assert _nearest_centroid_accuracy(dense, item_cluster) > 0.6
    assert _nearest_centroid_accuracy(data.user_features, data.extras["user_cluster"]) > 0.9


def test_actions_and_watch_ratio_follow_taste(data: Dataset) -> None:
    seqs = data.sequences
    users = np.repeat(np.arange(len(seqs)), seqs.lengths)
    matched = data.extras["item_cluster"][seqs.items] == data.extras["user_cluster"][users]
    skip, like = ACTIONS.index("skip"), ACTIONS.index("like")
    assert (seqs.actions[~matched] == skip).mean() > 2 * (seqs.actions[matched] == skip).mean()
    assert (seqs.actions[matched] == like).mean() > 2 * (seqs.actions[~matched] == like).mean()
    assert seqs.watch_ratio[matched].mean() > seqs.watch_ratio[~matched].mean() + 0.1
    assert seqs.watch_ratio[seqs.actions == skip].max() <= 0.15


def test_timestamps_have_sessions(data: Dataset) -> None:
    seqs = data.sequences
    gaps = np.diff(seqs.timestamps)
    first = np.zeros(len(gaps), bool)
    first[seqs.offsets[1:-1] - 1] = True  # gap that crosses into the next user
    gaps = gaps[~first]
    short, long = (gaps < 600).mean(), (gaps >= 1800).mean()
    assert short > 0.6 and 0.05 < long < 0.3
    assert np.median(gaps[gaps >= 1800]) > 3600


def test_cold_start_items_follow_cluster_distributions(data: Dataset) -> None:
    features, cluster = generate_cold_start_items(data, num_new=300, seed=5)
    assert len(features.category) == len(cluster) == 301 and cluster[0] == -1
    assert features.category[0] == 0 and not features.tags[0].any() and not features.numeric[0].any()
    assert features.num_tags == data.item_features.num_tags
    assert features.num_categories == data.item_features.num_categories
    # A nearest-centroid classifier fit on the catalogue recognises the new items' clusters.
    old_cluster = data.extras["item_cluster"][1:]
    old, new = data.item_features.dense_matrix()[1:], features.dense_matrix()[1:]
    centroids = np.stack([old[old_cluster == c].mean(axis=0) for c in range(old_cluster.max() + 1)])
    predicted = np.argmin(((new[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == cluster[1:]).mean() > 0.6
    again, _ = generate_cold_start_items(data, num_new=300, seed=5)
    np.testing.assert_array_equal(again.tags, features.tags)


def test_cold_start_needs_synthetic_data(data: Dataset) -> None:
    with pytest.raises(ValueError, match="generate_synthetic"):
        generate_cold_start_items(dataclasses.replace(data, extras={}), num_new=3, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_items=0),
        dict(num_clusters=5, num_items=3),
        dict(tags_per_item=10, num_tags=5),
        dict(min_len=9, max_len=8),
    ],
)
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        generate_synthetic(**kwargs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_users=st.integers(1, 30),
    num_items=st.integers(2, 40),
    num_clusters=st.integers(1, 6),
    num_tags=st.integers(1, 10),
    min_len=st.integers(1, 5),
    extra_len=st.integers(0, 10),
    markov_weight=st.floats(0, 1),
    stickiness=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_valid_arguments_give_a_valid_data_set(
    num_users, num_items, num_clusters, num_tags, min_len, extra_len, markov_weight, stickiness, seed
) -> None:
    num_clusters = min(num_clusters, num_items)
    ds = generate_synthetic(
        num_users=num_users,
        num_items=num_items,
        num_clusters=num_clusters,
        num_categories=3,
        num_tags=num_tags,
        tags_per_item=min(4, num_tags),
        num_numeric=2,
        min_len=min_len,
        max_len=min_len + extra_len,
        markov_weight=markov_weight,
        cluster_stickiness=stickiness,
        user_feature_dim=3,
        seed=seed,
        start_time=0,
    )
    _check_valid(ds, min_len=min_len, max_len=min_len + extra_len, start_time=0)


# --------------------------------------------------------------------------- the walk's own distribution


def _next_events(ds: Dataset):
    """Every event after a user's first: (user, previous item, latent cluster then, item)."""
    seqs = ds.sequences
    first = np.zeros(seqs.num_events, bool)
    first[seqs.offsets[:-1]] = True
    idx = np.flatnonzero(~first)
    users = np.repeat(np.arange(len(seqs)), seqs.lengths)[idx]
    return users, seqs.items[idx - 1], ds.extras["event_cluster"][idx - 1], seqs.items[idx]


def test_event_cluster_is_the_walks_latent_state(data: Dataset) -> None:
    ex = data.extras
    clusters = ex["event_cluster"]
    assert clusters.shape == data.sequences.items.shape and clusters.min() >= 0
    assert clusters.max() < ex["user_preference"].shape[1]
    # Every walk starts in the user's main cluster.
    assert np.array_equal(clusters[data.sequences.offsets[:-1]], ex["user_cluster"])
    # Draws that are not Markov steps come from the current cluster, and most Markov steps
    # stay in their cluster too: far more events match it than the 1 / C of chance.
    same = ex["item_cluster"][data.sequences.items] == clusters
    assert same.mean() > 0.7


def test_next_item_probabilities_are_a_distribution_that_covers_every_event(data: Dataset) -> None:
    users, prev, clusters, nxt = _next_events(data)
    probs = next_item_probabilities(data, users, prev, clusters)
    assert probs.shape == (len(users), data.num_items + 1)
    assert np.isfinite(probs).all() and (probs >= 0).all() and not probs[:, 0].any()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    # Any event the walk drew has positive probability (no draw path is missing).
    assert (probs[np.arange(len(nxt)), nxt] > 0).all()


def test_next_item_probabilities_are_calibrated(data: Dataset) -> None:
    """Over the ~66k drawn transitions, the share that lands on the most likely item (and in
    the ten most likely) equals the mean probability the distribution gives it, within 4
    standard errors: the formula is the walk, not an approximation of it."""
    users, prev, clusters, nxt = _next_events(data)
    probs = next_item_probabilities(data, users, prev, clusters)
    top = np.argsort(-probs, axis=1)[:, :10]
    for k in (1, 10):
        expected = np.take_along_axis(probs, top[:, :k], axis=1).sum(axis=1)
        hit = (top[:, :k] == nxt[:, None]).any(axis=1)
        se = np.sqrt((expected * (1 - expected)).sum()) / len(nxt)
        assert abs(hit.mean() - expected.mean()) < 4 * se, (k, hit.mean(), expected.mean(), se)
    # The successors carry the Markov share: P(next is a successor | Markov step) = 1.
    succ = data.extras["successors"][prev]
    stay, markov = data.extras["cluster_stickiness"], data.extras["markov_weight"]
    assert (succ == nxt[:, None]).any(axis=1).mean() >= stay * markov


def test_next_item_probabilities_reject_bad_input(data: Dataset) -> None:
    with pytest.raises(ValueError, match="one length"):
        next_item_probabilities(data, np.array([0, 1]), np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="clusters must lie"):
        next_item_probabilities(data, np.array([0]), np.array([1]), np.array([99]))
    plain = dataclasses.replace(data, extras={})
    with pytest.raises(ValueError, match="generate_synthetic"):
        next_item_probabilities(plain, np.array([0]), np.array([1]), np.array([0]))


def test_ceiling_bench_ranks_the_bayes_rule_above_the_baselines(tmp_path) -> None:
    """bench/synthetic_ceiling.py on the default job's data: the ceiling and the rule with
    the last item's cluster beat the transition baseline (ranking by the true probabilities
    maximises the expected hit rate), and it writes one JSON row per model."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench import synthetic_ceiling

    out = tmp_path / "rows.jsonl"
    assert synthetic_ceiling.main(["--json", str(out)]) == 0
    rows = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"Bayes ceiling, latent cluster", "generator's rule, last item's cluster", "popularity",
                         "transition"}
    latent, last = rows["Bayes ceiling, latent cluster"], rows["generator's rule, last item's cluster"]
    for metric in ("HR@10", "NDCG@10", "MRR"):
        assert latent[metric] >= last[metric] > rows["transition"][metric] > rows["popularity"][metric]
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        synthetic_ceiling.main(["--run", str(tmp_path / "nowhere")])

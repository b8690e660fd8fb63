"""Leave-one-out split, collation and the resumable, deterministic batch plan."""

import numpy as np
from hypothesis import given, strategies as st

from genrec_jax.data.batching import TrainLoader, bucket_sizes_for
from genrec_jax.data.sequences import CollateOptions, collate_eval, collate_train, leave_one_out
from genrec_jax.data.types import EventSequences

lengths_st = st.lists(st.integers(0, 30), min_size=1, max_size=12)


def make_seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    items = [rng.integers(1, 100, n) for n in lengths]
    ts = [np.sort(rng.integers(0, 10**6, n)) for n in lengths]
    acts = [rng.integers(0, 5, n) for n in lengths]
    return EventSequences.from_lists(items, acts, ts, [rng.random(n) for n in lengths])


@given(lengths=lengths_st, seed=st.integers(0, 1000))
def test_leave_one_out_holds_out_the_last_two_events(lengths, seed):
    seqs = make_seqs(lengths, seed)
    split = leave_one_out(seqs)
    evaluated = [u for u, n in enumerate(lengths) if n >= 3]
    assert len(split.test) == len(split.valid) == len(evaluated)
    for i, u in enumerate(evaluated):
        row = seqs.row(u)["items"]
        assert split.test.target_items[i] == row[-1]
        assert split.valid.target_items[i] == row[-2]
        np.testing.assert_array_equal(split.test.history.row(i)["items"], row[:-1])
        np.testing.assert_array_equal(split.valid.history.row(i)["items"], row[:-2])
    for u, n in enumerate(lengths):  # training never sees the last two events
        np.testing.assert_array_equal(split.train.row(u)["items"], seqs.row(u)["items"][: max(n - 2, 0)])


@given(n=st.integers(2, 40), max_len=st.integers(1, 12))
def test_train_collation_keeps_the_most_recent_events_and_shifts_targets(n, max_len):
    seqs = make_seqs([n])
    ev = seqs.row(0)
    b = collate_train(seqs, np.array([0, -1]), 16, max_len)
    L = min(n - 1, max_len)
    assert b["lengths"].tolist() == [L, 0]
    np.testing.assert_array_equal(b["items"][0, :L], ev["items"][n - 1 - L : n - 1])
    np.testing.assert_array_equal(b["targets"][0, :L], ev["items"][n - L : n])
    np.testing.assert_array_equal(b["query_timestamps"][0, :L] + ev["timestamps"][n - 1 - L],
                                  ev["timestamps"][n - L : n])
    assert np.all(b["items"][0, L:] == 0) and np.all(b["targets"][1] == 0)


def test_candidates_are_appended_with_unknown_action():
    seqs = make_seqs([10])
    ev = seqs.row(0)
    b = collate_train(seqs, np.array([0]), 16, 16, CollateOptions(num_candidates=3, unknown_action=5))
    assert b["lengths"][0] == 9 and b["num_targets"][0] == 3
    np.testing.assert_array_equal(b["items"][0, :9], np.concatenate([ev["items"][:6], ev["items"][7:]]))
    assert np.all(b["actions"][0, 6:9] == 5)
    np.testing.assert_array_equal(b["cand_actions"][0, 6:9], ev["actions"][7:])
    assert np.all(b["targets"][0, 6:9] == 0) and b["targets"][0, 5] == ev["items"][6]
    # Candidates carry the request time (the first candidate's event time).
    assert np.all(b["timestamps"][0, 6:9] == ev["timestamps"][7] - ev["timestamps"][0])


def test_eval_collation_uses_target_time_for_the_last_query():
    seqs = make_seqs([8, 4])
    split = leave_one_out(seqs)
    b = collate_eval(split.test, np.array([0, 1, -1]), 5)
    assert b["lengths"].tolist() == [5, 3, 0] and b["valid_rows"].tolist() == [True, True, False]
    h = split.test.history.row(0)
    origin = h["timestamps"][-5]
    assert b["query_timestamps"][0, 4] == split.test.target_timestamps[0] - origin
    assert len(b["history_items"][0]) == 7


def test_multiscale_windows_cover_the_older_events():
    seqs = make_seqs([30])
    opts = CollateOptions(short_len=8, long_window=4, max_long_tokens=3)
    b = collate_train(seqs, np.array([0]), 8, 8, opts)
    ev = seqs.row(0)["items"]
    # inputs = events 21..28, the long part = events up to 20, the 3 most recent windows.
    np.testing.assert_array_equal(b["items"][0], ev[21:29])
    assert b["num_long"][0] == 3
    np.testing.assert_array_equal(b["long_items"][0].reshape(-1), ev[9:21])


def test_batch_plan_is_deterministic_and_covers_every_row_once_per_epoch():
    seqs = make_seqs(list(range(2, 40)) * 3, seed=1)
    mk = lambda: TrainLoader(seqs, batch_size=8, max_len=20, bucket_sizes=[4, 8], seed=7)  # noqa: E731
    a, b = mk(), mk()
    pa, pb = a.epoch_plan(0), b.epoch_plan(0)
    assert [(s, r.tolist()) for s, r in pa] == [(s, r.tolist()) for s, r in pb]
    rows = np.concatenate([r for _, r in pa])
    rows = rows[rows >= 0]
    assert sorted(rows.tolist()) == sorted(a.rows.tolist())
    assert [r.tolist() for _, r in a.epoch_plan(1)] != [r.tolist() for _, r in pa]
    assert bucket_sizes_for(20, [4, 8, 32]) == [4, 8, 20]
    for size, r in pa:  # each row lands in the smallest bucket that fits its input
        lens = np.minimum(seqs.lengths[r[r >= 0]] - 1, 20)
        assert lens.max() <= size


def test_loader_resumes_exactly():
    seqs = make_seqs(list(range(2, 30)) * 2, seed=2)
    ref = TrainLoader(seqs, batch_size=4, max_len=16, bucket_sizes=[8], seed=3)
    full = [ref.next_batch()["items"] for _ in range(40)]  # crosses an epoch boundary
    a = TrainLoader(seqs, batch_size=4, max_len=16, bucket_sizes=[8], seed=3)
    for _ in range(17):
        a.next_batch()
    b = TrainLoader(seqs, batch_size=4, max_len=16, bucket_sizes=[8], seed=3)
    b.load_state_dict(a.state_dict())
    rest = [b.next_batch()["items"] for _ in range(23)]
    for x, y in zip(full[17:], rest):
        np.testing.assert_array_equal(x, y)

"""serve.inputs: request histories become exactly the arrays evaluation feeds the model."""

import numpy as np
import pytest

from genrec_jax.data.sequences import EvalSet, collate_eval
from genrec_jax.data.types import EventSequences
from genrec_jax.serve.errors import RequestError
from genrec_jax.serve.inputs import Catalog, History, chunks, pad_batch, parse_history, pick_bucket

CAT = Catalog(["<pad>", "a", "b", "c", "d"], ["view", "like", "skip"])


def test_pad_batch_matches_collate_eval(rng):
    lens = [3, 9, 1]
    items = [rng.integers(1, 5, n) for n in lens]
    acts = [rng.integers(0, 3, n) for n in lens]
    ts = [np.cumsum(rng.integers(0, 1000, n)) + 10_000 for n in lens]
    target_ts = np.array([t[-1] + 77 for t in ts])
    es = EvalSet(EventSequences.from_lists(items, acts, ts), np.ones(3, np.int32), np.zeros(3, np.int32),
                 target_ts, np.zeros(3, np.float32))
    ref = collate_eval(es, np.array([0, 1, 2]), pad_len=6)
    hist = [History(items[i].astype(np.int32), acts[i].astype(np.int32), ts[i], int(target_ts[i])) for i in range(3)]
    got = pad_batch(hist, batch_size=4, seq_len=6, max_len=6)
    for key in ("items", "actions", "timestamps", "query_timestamps", "lengths"):
        np.testing.assert_array_equal(got[key][:3], ref[key], err_msg=f"{key} differs from collate_eval")
        assert not got[key][3].any(), f"filler row has non-zero {key}"


def test_parse_history_maps_ids_and_defaults():
    h = parse_history([{"item_id": "b"}, {"item_id": "d", "action": "like"}], CAT, max_history_len=10)
    np.testing.assert_array_equal(h.items, [2, 4])
    np.testing.assert_array_equal(h.actions, [0, 1])
    np.testing.assert_array_equal(h.timestamps, [0, 1])  # no timestamps: one second per event
    assert h.request_ts == 1


@pytest.mark.parametrize("events, ts, field", [
    ([], None, "history"),
    ([{"item_id": "zz"}], None, "history[0].item_id"),
    ([{"item_id": "a"}, {"item_id": True}], None, "history[1].item_id"),
    ([{"item_id": "a", "action": "buy"}], None, "history[0].action"),
    ([{"item_id": "a", "timestamp": 5}, {"item_id": "b"}], None, "history[1].timestamp"),
    ([{"item_id": "a", "timestamp": 5}, {"item_id": "b", "timestamp": 4}], None, "history[1].timestamp"),
    ([{"item_id": "a", "timestamp": 5}], 4, "context.timestamp"),
    ([{"item_id": "a"}] * 11, None, "history"),
])
def test_parse_history_errors_name_the_field(events, ts, field):
    with pytest.raises(RequestError) as e:
        parse_history(events, CAT, max_history_len=10, request_ts=ts)
    assert e.value.field == field, e.value.message


def test_registered_items_join_the_catalogue():
    cat = Catalog(["<pad>", "a"], ["view"])
    assert cat.add(["new"]) == [2]
    assert "new" in cat and len(cat) == 2 and cat.num_trained == 1
    assert parse_history([{"item_id": "new"}], cat, max_history_len=4).items.tolist() == [2]
    with pytest.raises(RequestError):
        cat.add(["a"])


def test_buckets():
    assert pick_bucket(3, [1, 4, 16]) == 4 and pick_bucket(17, [1, 4, 16]) is None
    assert chunks(9, [1, 4]) == [(0, 4, 4), (4, 8, 4), (8, 9, 1)]
    assert chunks(6, [1, 4, 16]) == [(0, 6, 16)]

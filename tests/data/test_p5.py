"""The P5 (Amazon Reviews sequential format) loader, on small files written by the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.data.p5 import load_p5

SEQUENCES = "1 1 2 3\n2 4 2\n3 3 1 5 4\n"
DATAMAPS = {
    "item2id": {"B001": "1", "B002": "2", "B003": "3", "B004": "4", "B005": "5"},
    "id2item": {"1": "B001", "2": "B002", "3": "B003", "4": "B004", "5": "B005"},
    "user2id": {"AU1": "1", "AU2": "2", "AU3": "3"},
    "id2user": {"1": "AU1", "2": "AU2", "3": "AU3"},
    "attribute2id": {"red": 1},
}


def _write(directory: Path, sequences: str, datamaps: dict | None = DATAMAPS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sequential_data.txt").write_text(sequences, encoding="utf-8")
    if datamaps is not None:
        (directory / "datamaps.json").write_text(json.dumps(datamaps), encoding="utf-8")
    return directory


def test_parses_sequences_in_order(tmp_path: Path) -> None:
    ds = load_p5(_write(tmp_path / "beauty", SEQUENCES), name="beauty")
    assert ds.name == "beauty" and ds.num_users == 3 and ds.num_items == 5
    assert ds.sequences.num_events == 9
    np.testing.assert_array_equal(ds.sequences.lengths, [3, 2, 4])
    # File ids are exactly 1..N: internal ids equal them.
    np.testing.assert_array_equal(ds.sequences.row(0)["items"], [1, 2, 3])
    np.testing.assert_array_equal(ds.sequences.row(2)["items"], [3, 1, 5, 4])
    assert not ds.has_timestamps
    np.testing.assert_array_equal(ds.sequences.row(2)["timestamps"], [0, 1, 2, 3])
    assert not ds.sequences.actions.any() and ds.action_names[0] == "view"
    assert ds.item_features is None and ds.user_features is None
    np.testing.assert_array_equal(ds.item_popularity(), [0, 2, 2, 2, 2, 1])


def test_original_ids_come_from_datamaps(tmp_path: Path) -> None:
    ds = load_p5(_write(tmp_path, SEQUENCES))
    assert list(ds.item_ids) == ["<pad>", "B001", "B002", "B003", "B004", "B005"]
    assert list(ds.user_ids) == ["AU1", "AU2", "AU3"]
    assert list(ds.extras["file_user_ids"]) == ["1", "2", "3"]
    assert list(ds.extras["file_item_ids"]) == ["<pad>", "1", "2", "3", "4", "5"]


def test_datamaps_is_optional(tmp_path: Path) -> None:
    ds = load_p5(_write(tmp_path, SEQUENCES, datamaps=None))
    assert list(ds.item_ids) == ["<pad>", "1", "2", "3", "4", "5"]
    assert list(ds.user_ids) == ["1", "2", "3"]


def test_forward_maps_are_inverted_when_inverse_maps_are_missing(tmp_path: Path) -> None:
    maps = {"item2id": DATAMAPS["item2id"], "user2id": DATAMAPS["user2id"]}
    ds = load_p5(_write(tmp_path, SEQUENCES, datamaps=maps))
    assert ds.item_ids[4] == "B004" and ds.user_ids[1] == "AU2"


def test_sparse_ids_are_remapped_densely_in_id_order(tmp_path: Path) -> None:
    ds = load_p5(_write(tmp_path, "7 30 10\n8 10 500 30\n", datamaps={"id2item": {"500": "X500"}}))
    assert ds.num_items == 3
    assert list(ds.extras["file_item_ids"]) == ["<pad>", "10", "30", "500"]
    assert list(ds.item_ids) == ["<pad>", "10", "30", "X500"]
    np.testing.assert_array_equal(ds.sequences.row(0)["items"], [2, 1])
    np.testing.assert_array_equal(ds.sequences.row(1)["items"], [1, 3, 2])


def test_blank_lines_and_extra_spaces_are_tolerated(tmp_path: Path) -> None:
    ds = load_p5(_write(tmp_path, "1  1 2\r\n\n2\t3 1  \n\n"))
    assert ds.num_users == 2
    np.testing.assert_array_equal(ds.sequences.items, [1, 2, 3, 1])


def test_missing_directory_explains_how_to_configure(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "amazon-beauty"
    with pytest.raises(FileNotFoundError) as info:
        load_p5(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "data.data_dir" in message and "GENREC_DATA_DIR" in message
    assert "python -m genrec_jax.data.fetch amazon-beauty" in message


def test_missing_sequence_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "datamaps.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sequential_data.txt") as info:
        load_p5(tmp_path)
    assert "GENREC_DATA_DIR" in str(info.value)


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("1 1 2\n2 3 x\n", 2, "not a positive integer"),
        ("1 1 2\n\n3 1 -4\n", 3, "not a positive integer"),
        ("1 1 2\n2\n", 2, "no items"),
        ("1 1 2\n2 0 1\n", 2, "start at 1"),
        ("1 1 2\n2 3\n1 4\n", 3, "already listed on line 1"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, content: str, line: int, what: str) -> None:
    _write(tmp_path, content, datamaps=None)
    with pytest.raises(ValueError, match=what) as info:
        load_p5(tmp_path)
    assert "sequential_data.txt" in str(info.value) and f"line {line}" in str(info.value)


def test_broken_datamaps_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, SEQUENCES, datamaps=None)
    (tmp_path / "datamaps.json").write_text("{not json")
    with pytest.raises(ValueError, match="datamaps.json"):
        load_p5(tmp_path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(1, 10**6), min_size=1, max_size=8), min_size=1, max_size=8))
def test_round_trip_preserves_sequences(tmp_path_factory, sequences: list[list[int]]) -> None:
    directory = tmp_path_factory.mktemp("p5")
    text = "".join(f"{u + 1} " + " ".join(map(str, seq)) + "\n" for u, seq in enumerate(sequences))
    ds = load_p5(_write(directory, text, datamaps=None))
    file_ids = ds.extras["file_item_ids"]
    assert ds.num_items == len({i for seq in sequences for i in seq})
    for u, seq in enumerate(sequences):
        assert [int(file_ids[i]) for i in ds.sequences.row(u)["items"]] == seq
    assert ds.sequences.items.min() >= 1 and ds.sequences.items.max() == ds.num_items


@pytest.mark.realdata
def test_real_amazon_beauty() -> None:
    root = os.environ.get("GENREC_DATA_DIR")
    if not root:
        pytest.skip("GENREC_DATA_DIR is not set (it should hold amazon-beauty/)")
    directory = Path(root) / "amazon-beauty"
    if not (directory / "sequential_data.txt").is_file():
        pytest.skip(f"{directory}/sequential_data.txt not found (python -m genrec_jax.data.fetch amazon-beauty)")
    ds = load_p5(directory)
    assert ds.num_users == 22_363
    assert ds.num_items == 12_101
    assert ds.sequences.num_events == 198_502
    assert ds.sequences.lengths.min() >= 5
    # The file's ids are 1..N, so internal ids equal them.
    assert list(ds.extras["file_item_ids"][1:4]) == ["1", "2", "3"]
    assert ds.item_ids[1] == "B004756YJA"

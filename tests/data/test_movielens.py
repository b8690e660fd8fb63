"""The MovieLens-1M loader, on a small GroupLens-format directory written by the tests."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from genrec_jax.data.movielens import GENRES, load_movielens_1m
from genrec_jax.data.types import ACTIONS

MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Misérables, Les (1995)::Drama|Musical",
    "5::Café au Lait (Métisse) (1993)::Comedy",
    "7::Unrated Film (1990)::Horror",  # in the catalogue but never rated: not an item
    "10::Über Mensch (2000)::Action|Adventure|Sci-Fi|Thriller|War|Western",
]
USERS = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::0::55117",  # no ratings: not a user of the data set
]
# User 2 appears before user 1 and rates two movies at the same second (file order must win).
RATINGS = [
    "2::10::5::978300760",
    "1::5::3::978300900",
    "2::1::1::978300100",
    "1::1::4::978300800",
    "2::2::2::978300760",
    "1::2::5::978300800",
]


def _write_ml(directory: Path, ratings=RATINGS, movies=MOVIES, users=USERS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in (("ratings", ratings), ("movies", movies), ("users", users)):
        if lines is not None:
            (directory / f"{name}.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return directory


@pytest.fixture()
def ml(tmp_path: Path):
    return load_movielens_1m(_write_ml(tmp_path / "ml-1m"))


def test_users_items_and_order(ml) -> None:
    assert ml.name == "ml-1m" and ml.has_timestamps
    assert list(ml.user_ids) == ["1", "2"]
    # Rated movies only, dense in movie-id order.
    assert ml.num_items == 4 and list(ml.item_ids) == ["<pad>", "1", "2", "5", "10"]
    user1, user2 = ml.sequences.row(0), ml.sequences.row(1)
    # User 1: movie 1 and 2 share a timestamp, movie 1 comes first in the file.
    np.testing.assert_array_equal(user1["items"], [1, 2, 3])
    np.testing.assert_array_equal(user1["timestamps"], [978300800, 978300800, 978300900])
    # User 2: movie 1 first (earliest), then 10 before 2 (same second, file order).
    np.testing.assert_array_equal(user2["items"], [1, 4, 2])
    np.testing.assert_array_equal(ml.sequences.user_index, [0, 1])


def test_ratings_become_actions_and_watch_ratio(ml) -> None:
    user1, user2 = ml.sequences.row(0), ml.sequences.row(1)
    like, view, skip = ACTIONS.index("like"), ACTIONS.index("view"), ACTIONS.index("skip")
    np.testing.assert_array_equal(user1["actions"], [like, like, view])  # ratings 4, 5, 3
    np.testing.assert_array_equal(user2["actions"], [skip, like, skip])  # ratings 1, 5, 2
    np.testing.assert_allclose(user1["watch_ratio"], [0.8, 1.0, 0.6])
    assert ml.sequences.watch_ratio.dtype == np.float32


def test_item_features(ml) -> None:
    feats = ml.item_features
    g = {name: GENRES.index(name) + 1 for name in GENRES}
    assert feats.num_categories == 18 and feats.num_tags == 18
    np.testing.assert_array_equal(feats.category, [0, g["Animation"], g["Drama"], g["Comedy"], g["Action"]])
    np.testing.assert_array_equal(feats.tags[1], [g["Animation"], g["Children's"], g["Comedy"], 0, 0, 0])
    np.testing.assert_array_equal(
        feats.tags[4], [g["Action"], g["Adventure"], g["Sci-Fi"], g["Thriller"], g["War"], g["Western"]]
    )
    assert not feats.tags[0].any() and not feats.numeric[0].any()
    # numeric = [year normalised over the catalogue (1993..2000), genre count / 6]
    np.testing.assert_allclose(feats.numeric[1:, 0], [2 / 7, 2 / 7, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(feats.numeric[1:, 1], [3 / 6, 2 / 6, 1 / 6, 1.0], rtol=1e-6)
    assert feats.dense_matrix().shape == (5, 19 + 19 + 2)


def test_extras(ml) -> None:
    genres = ml.extras["movie_genres"]
    assert genres.shape == (5, 18) and genres.dtype == np.float32
    assert genres[1].sum() == 3 and genres[4].sum() == 6 and not genres[0].any()
    np.testing.assert_array_equal(ml.extras["movie_year"], [0, 1995, 1995, 1993, 2000])
    # Latin-1 titles are decoded, the year is split off.
    titles = ["Toy Story", "Misérables, Les", "Café au Lait (Métisse)", "Über Mensch"]
    assert list(ml.extras["movie_titles"][1:]) == titles
    title_hash = ml.extras["title_hash"]
    assert title_hash.shape == (5, 8) and title_hash.dtype == np.int32
    assert title_hash.min() >= 0 and title_hash.max() <= 4096
    expected = [zlib.crc32(w.encode()) % 4096 + 1 for w in ("café", "au", "lait", "métisse")]
    np.testing.assert_array_equal(title_hash[3], expected + [0] * 4)


def test_user_features(ml) -> None:
    feats = ml.user_features
    assert feats.shape == (2, 29) and feats.dtype == np.float32
    # User 1: F, age "1" (bucket 0), occupation 10. User 2: M, age 56 (bucket 6), occupation 16.
    assert feats[0, 0] == 0 and feats[0, 1] == 1 and feats[0, 8 + 10] == 1
    assert feats[1, 0] == 1 and feats[1, 7] == 1 and feats[1, 8 + 16] == 1
    np.testing.assert_array_equal(feats[:, 1:8].sum(axis=1), [1, 1])
    np.testing.assert_array_equal(feats[:, 8:].sum(axis=1), [1, 1])
    assert list(ml.extras["user_zip"]) == ["48067", "70072"]


@pytest.mark.parametrize("missing", ["ratings", "movies", "users"])
def test_missing_files_are_named(tmp_path: Path, missing: str) -> None:
    files = {"ratings": RATINGS, "movies": MOVIES, "users": USERS}
    files[missing] = None
    _write_ml(tmp_path, **files)
    with pytest.raises(FileNotFoundError) as info:
        load_movielens_1m(tmp_path)
    message = str(info.value)
    assert f"{missing}.dat" in message and "GENREC_DATA_DIR" in message and "data.data_dir" in message
    assert "python -m genrec_jax.data.fetch ml-1m" in message


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        load_movielens_1m(tmp_path / "absent")


@pytest.mark.parametrize(
    ("ratings", "line", "what"),
    [
        (RATINGS[:2] + ["1::2::5"], 3, "expected 4"),
        (RATINGS[:3] + ["1::x::5::978300800"], 4, "integers"),
        (["1::2::5::978300800::9"], 1, "expected 4"),
    ],
)
def test_malformed_rating_lines(tmp_path: Path, ratings, line: int, what: str) -> None:
    _write_ml(tmp_path, ratings=ratings)
    with pytest.raises(ValueError, match=what) as info:
        load_movielens_1m(tmp_path)
    assert "ratings.dat" in str(info.value) and f"line {line}" in str(info.value)


def test_inconsistent_files(tmp_path: Path) -> None:
    _write_ml(tmp_path, ratings=RATINGS + ["1::99::4::978300800"])
    with pytest.raises(ValueError, match="movie ids not in"):
        load_movielens_1m(tmp_path)
    _write_ml(tmp_path, ratings=RATINGS + ["9::1::4::978300800"])
    with pytest.raises(ValueError, match="user ids not in"):
        load_movielens_1m(tmp_path)
    _write_ml(tmp_path, ratings=["1::1::6::978300800"])
    with pytest.raises(ValueError, match="outside 1..5"):
        load_movielens_1m(tmp_path)
    _write_ml(tmp_path, users=USERS + ["4::X::25::0::55117"])
    with pytest.raises(ValueError, match="users.dat, line 4"):
        load_movielens_1m(tmp_path)


def test_windows_line_endings(tmp_path: Path) -> None:
    _write_ml(tmp_path)
    for name in ("ratings", "movies", "users"):
        path = tmp_path / f"{name}.dat"
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    ml = load_movielens_1m(tmp_path)
    assert ml.sequences.num_events == 6 and ml.extras["movie_titles"][1] == "Toy Story"

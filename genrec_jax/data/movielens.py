"""MovieLens-1M in the GroupLens ``.dat`` format.

A data set directory holds three latin-1 text files with ``::`` separators:
  * ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``
  * ``movies.dat``:  ``MovieID::Title (Year)::Genre1|Genre2|...``
  * ``users.dat``:   ``UserID::Gender::Age::Occupation::Zip-code``

Choices made here:
  * users are those with at least one rating, in order of user id; each user's ratings
    are sorted by timestamp, ties kept in file order (stable sort);
  * items are the rated movies, mapped densely to 1..N in order of movie id (ML-1M:
    3,706 of the 3,883 catalogued movies have ratings);
  * ratings become actions: >= 4 "like", <= 2 "skip", 3 "view"; ``watch_ratio`` is
    rating / 5.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from genrec_jax.data.types import ACTIONS, Dataset, EventSequences, ItemFeatures

GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
AGE_BUCKETS: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)
NUM_OCCUPATIONS = 21
MAX_TAGS = 6  # the most genres any ML-1M movie has
TITLE_TOKENS = 8
TITLE_VOCAB = 4096

_ENCODING = "latin-1"
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
_WORD = re.compile(r"\w+")
_RATING_LINE = re.compile(r"^[ \t]*[0-9]+::[0-9]+::[0-9]+::[0-9]+[ \t]*\r?$", re.MULTILINE)
_LIKE, _VIEW, _SKIP = ACTIONS.index("like"), ACTIONS.index("view"), ACTIONS.index("skip")


def load_movielens_1m(directory: str | Path) -> Dataset:
    """Load an ML-1M directory (the unpacked ``ml-1m.zip``)."""
    directory = Path(directory)
    paths = {name: directory / f"{name}.dat" for name in ("ratings", "movies", "users")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens-1M: missing {', '.join(missing)}. Set `data.data_dir` in the config or the "
            "GENREC_DATA_DIR environment variable to the folder that holds 'ml-1m/', or download it "
            "with `python -m genrec_jax.data.fetch ml-1m --dest DIR`."
        )

    ratings = _read_ratings(paths["ratings"])
    movies = _read_movies(paths["movies"])
    users = _read_users(paths["users"])

    user_raw, movie_raw, rating, timestamp = ratings.T
    # Stable sort: by user, then time; equal (user, time) pairs keep file order.
    order = np.lexsort((timestamp, user_raw))
    user_raw, movie_raw, rating, timestamp = user_raw[order], movie_raw[order], rating[order], timestamp[order]

    movie_ids = np.unique(movie_raw)
    user_list, user_pos = np.unique(user_raw, return_index=True)
    offsets = np.concatenate([user_pos, [len(user_raw)]])

    unknown_movies = [m for m in movie_ids.tolist() if m not in movies]
    if unknown_movies:
        raise ValueError(f"{paths['ratings']}: movie ids not in {paths['movies']}: {unknown_movies[:10]}")
    unknown_users = [u for u in user_list.tolist() if u not in users]
    if unknown_users:
        raise ValueError(f"{paths['ratings']}: user ids not in {paths['users']}: {unknown_users[:10]}")

    sequences = EventSequences(
        offsets=offsets,
        items=np.searchsorted(movie_ids, movie_raw) + 1,
        actions=np.where(rating >= 4, _LIKE, np.where(rating <= 2, _SKIP, _VIEW)),
        timestamps=timestamp,
        watch_ratio=rating / 5.0,
        user_index=np.arange(len(user_list)),
    )
    item_features, extras = _movie_features([movies[m] for m in movie_ids.tolist()])
    extras["movie_titles"] = np.array(["<pad>"] + [movies[m][0] for m in movie_ids.tolist()], dtype=object)
    extras["user_zip"] = np.array([users[u][3] for u in user_list.tolist()], dtype=object)
    return Dataset(
        name="ml-1m",
        sequences=sequences,
        num_items=len(movie_ids),
        item_ids=np.array(["<pad>"] + [str(m) for m in movie_ids.tolist()], dtype=object),
        user_ids=np.array([str(u) for u in user_list.tolist()], dtype=object),
        action_names=ACTIONS,
        item_features=item_features,
        user_features=_user_features([users[u] for u in user_list.tolist()]),
        has_timestamps=True,
        extras=extras,
    )


def _split_lines(path: Path, num_fields: int):
    """Yield ``(line_number, fields)`` for each non-blank line, checking the field count."""
    with open(path, encoding=_ENCODING) as f:
        for line_number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("::")
            if len(fields) != num_fields:
                raise ValueError(
                    f"{path}, line {line_number}: expected {num_fields} '::'-separated fields, got {len(fields)}"
                )
            yield line_number, fields


def _read_ratings(path: Path) -> np.ndarray:
    """int64 [R, 4]: user, movie, rating, timestamp, in file order."""
    # Fast path for the million-line file: numpy parses the whole text at once. Any
    # irregularity falls back to the line-by-line pass, which names the bad line.
    text = path.read_text(encoding=_ENCODING)
    num_lines = sum(1 for line in text.splitlines() if line.strip())
    if len(_RATING_LINE.findall(text)) == num_lines:
        table = np.array(text.replace("::", " ").split(), dtype=np.int64).reshape(-1, 4)
        return _check_ratings(path, table)
    rows = []
    for line_number, fields in _split_lines(path, 4):
        try:
            rows.append([int(x) for x in fields])
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: ratings fields must be integers: {fields}") from None
    return _check_ratings(path, np.array(rows, dtype=np.int64).reshape(-1, 4))


def _check_ratings(path: Path, table: np.ndarray) -> np.ndarray:
    bad = np.flatnonzero((table[:, 2] < 1) | (table[:, 2] > 5))
    if len(bad):
        raise ValueError(f"{path}: rating {table[bad[0], 2]} outside 1..5 (row {bad[0] + 1})")
    return table


def _read_movies(path: Path) -> dict[int, tuple[str, int, list[str]]]:
    """Movie id -> (title without year, year or 0, genres)."""
    movies = {}
    for line_number, (movie, title, genres) in _split_lines(path, 3):
        try:
            movie_id = int(movie)
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: movie id {movie!r} is not an integer") from None
        match = _TITLE_YEAR.match(title)
        name, year = (match.group(1), int(match.group(2))) if match else (title.strip(), 0)
        movies[movie_id] = (name, year, [g for g in genres.split("|") if g])
    return movies


def _read_users(path: Path) -> dict[int, tuple[int, int, int, str]]:
    """User id -> (gender 0/1, age bucket index, occupation, zip code)."""
    users = {}
    for line_number, (user, gender, age, occupation, zip_code) in _split_lines(path, 5):
        try:
            user_id, age_value, occupation_id = int(user), int(age), int(occupation)
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: user, age and occupation must be integers") from None
        if gender not in ("F", "M"):
            raise ValueError(f"{path}, line {line_number}: gender {gender!r} is not F or M")
        if age_value not in AGE_BUCKETS:
            raise ValueError(f"{path}, line {line_number}: age {age_value} is not one of {AGE_BUCKETS}")
        if not 0 <= occupation_id < NUM_OCCUPATIONS:
            raise ValueError(f"{path}, line {line_number}: occupation {occupation_id} outside 0..20")
        users[user_id] = (int(gender == "M"), AGE_BUCKETS.index(age_value), occupation_id, zip_code)
    return users


def _movie_features(movies: list[tuple[str, int, list[str]]]) -> tuple[ItemFeatures, dict[str, np.ndarray]]:
    """Item features (row 0 padding) and the fuller per-movie arrays kept in extras."""
    n = len(movies) + 1
    category = np.zeros(n, np.int32)
    tags = np.zeros((n, MAX_TAGS), np.int32)
    genre_hot = np.zeros((n, len(GENRES)), np.float32)
    year = np.zeros(n, np.int64)
    title_hash = np.zeros((n, TITLE_TOKENS), np.int32)
    for row, (title, movie_year, genres) in enumerate(movies, start=1):
        # Unknown genre names (none in ML-1M) are dropped rather than guessed.
        genre_ids = [GENRES.index(g) + 1 for g in genres if g in GENRES]
        category[row] = genre_ids[0] if genre_ids else 0
        tags[row, : min(len(genre_ids), MAX_TAGS)] = genre_ids[:MAX_TAGS]
        genre_hot[row, [g - 1 for g in genre_ids]] = 1.0
        year[row] = movie_year
        tokens = [_hash_word(w) for w in _WORD.findall(title.lower())][:TITLE_TOKENS]
        title_hash[row, : len(tokens)] = tokens

    numeric = np.zeros((n, 2), np.float32)
    known = year > 0
    if known[1:].any():
        lo, hi = year[known].min(), year[known].max()
        numeric[known, 0] = (year[known] - lo) / max(hi - lo, 1)  # unknown year stays 0
    numeric[1:, 1] = genre_hot[1:].sum(axis=1) / MAX_TAGS
    features = ItemFeatures(
        category=category, tags=tags, numeric=numeric, num_categories=len(GENRES), num_tags=len(GENRES)
    )
    return features, {"movie_genres": genre_hot, "movie_year": year, "title_hash": title_hash}


def _hash_word(word: str) -> int:
    """Stable word id in 1..TITLE_VOCAB (crc32, unlike ``hash``, is not salted per process)."""
    return zlib.crc32(word.encode("utf-8")) % TITLE_VOCAB + 1


def _user_features(users: list[tuple[int, int, int, str]]) -> np.ndarray:
    """float32 [U, 29]: gender, age bucket one-hot (7), occupation one-hot (21)."""
    out = np.zeros((len(users), 1 + len(AGE_BUCKETS) + NUM_OCCUPATIONS), np.float32)
    for row, (gender, age_index, occupation, _) in enumerate(users):
        out[row, 0] = gender
        out[row, 1 + age_index] = 1.0
        out[row, 1 + len(AGE_BUCKETS) + occupation] = 1.0
    return out

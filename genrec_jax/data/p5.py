"""Amazon Reviews in the P5 sequential format (the split TIGER and P5 report on).

A data set directory holds:
  * ``sequential_data.txt``: one line per user, ``user_id item_1 item_2 ...``, items in
    chronological order, integer ids (as strings) starting at 1;
  * ``datamaps.json`` (optional): ``item2id`` / ``id2item`` / ``user2id`` / ``id2user``
    between the original Amazon ids and the file's ids (attribute maps are ignored).

The format has no timestamps, ratings or item features: events get the positions
0..n-1 as timestamps, action 0 ("view") and ``has_timestamps=False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genrec_jax.data.types import ACTIONS, Dataset, EventSequences

SEQUENCE_FILE = "sequential_data.txt"
DATAMAPS_FILE = "datamaps.json"


def load_p5(directory: str | Path, name: str = "amazon-beauty") -> Dataset:
    """Load one P5 data set directory (e.g. ``$GENREC_DATA_DIR/amazon-beauty``)."""
    directory = Path(directory)
    sequence_path = directory / SEQUENCE_FILE
    if not sequence_path.is_file():
        raise FileNotFoundError(_missing_message(directory, sequence_path, name))

    file_users, file_sequences = _read_sequences(sequence_path)
    id2item, id2user = _read_datamaps(directory / DATAMAPS_FILE)

    # Dense internal ids in order of the file's integer ids. When the file's ids are
    # exactly 1..N (as in Beauty) this is the identity, so item numbers stay comparable
    # with other code that reads the same files.
    distinct = np.unique(np.concatenate(file_sequences)) if file_sequences else np.zeros(0, np.int64)
    items = [np.searchsorted(distinct, seq) + 1 for seq in file_sequences]
    file_item_ids = [str(i) for i in distinct]

    item_ids = np.array(["<pad>"] + [id2item.get(i, i) for i in file_item_ids], dtype=object)
    user_ids = np.array([id2user.get(u, u) for u in file_users], dtype=object)
    return Dataset(
        name=name,
        sequences=EventSequences.from_lists(items),
        num_items=len(distinct),
        item_ids=item_ids,
        user_ids=user_ids,
        action_names=ACTIONS,
        item_features=None,
        user_features=None,
        has_timestamps=False,
        extras={
            # The file's own ids, for comparing with code that works on them directly.
            "file_user_ids": np.array(file_users, dtype=object),
            "file_item_ids": np.array(["<pad>"] + file_item_ids, dtype=object),
        },
    )


def _missing_message(directory: Path, sequence_path: Path, name: str) -> str:
    what = f"data directory {directory}" if not directory.is_dir() else f"file {sequence_path}"
    return (
        f"P5 data set '{name}': {what} not found (expected {sequence_path}). "
        "Set `data.data_dir` in the config or the GENREC_DATA_DIR environment variable to the "
        f"folder that holds '{name}/', or download it with "
        f"`python -m genrec_jax.data.fetch {name} --dest DIR`."
    )


def _read_sequences(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """User ids and item-id arrays (file ids, as int64) in file order."""
    users: list[str] = []
    sequences: list[np.ndarray] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:  # blank lines (e.g. a trailing one) carry nothing
                continue
            user, tokens = fields[0], fields[1:]
            if not tokens:
                raise ValueError(f"{path}, line {line_number}: user {user!r} has no items")
            if user in seen:
                raise ValueError(f"{path}, line {line_number}: user {user!r} already listed on line {seen[user]}")
            if not all(t.isascii() and t.isdigit() for t in tokens):
                bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
                raise ValueError(f"{path}, line {line_number}: item id {bad!r} is not a positive integer")
            seq = np.array(tokens, dtype=np.int64)
            if (seq < 1).any():
                raise ValueError(f"{path}, line {line_number}: item ids start at 1, found 0")
            seen[user] = line_number
            users.append(user)
            sequences.append(seq)
    return users, sequences


def _read_datamaps(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``id2item`` and ``id2user`` (file id -> original id); empty when the file is absent."""
    if not path.is_file():
        return {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            maps = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(maps, dict):
        raise ValueError(f"{path}: expected a JSON object with id2item / id2user")
    return _inverse_map(maps, "id2item", "item2id"), _inverse_map(maps, "id2user", "user2id")


def _inverse_map(maps: dict, direct: str, forward: str) -> dict[str, str]:
    """``maps[direct]`` if present, else the inverse of ``maps[forward]``, keys as strings."""
    if isinstance(maps.get(direct), dict):
        return {str(k): str(v) for k, v in maps[direct].items()}
    if isinstance(maps.get(forward), dict):
        return {str(v): str(k) for k, v in maps[forward].items()}
    return {}

"""Containers shared by every data source: jagged event sequences and a loaded data set.

Conventions used across the package:
  * item ids are dense int32 in ``1..num_items``; 0 is padding and never a real item;
  * a user's events are chronological (oldest first);
  * jagged arrays are stored as one flat ``values`` array plus ``offsets`` (length U+1),
    so user ``u`` owns ``values[offsets[u]:offsets[u+1]]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Action vocabulary of the synthetic data (and the default for sources without actions).
# Index 0 is "view", the action every data set without explicit actions uses.
ACTIONS: tuple[str, ...] = ("view", "like", "share", "skip", "purchase")
ENGAGED_ACTIONS: tuple[str, ...] = ("like", "share", "purchase")

# Token types for Group LayerNorm and the multi-scale encoder.
TOKEN_USER, TOKEN_EVENT, TOKEN_ITEM, TOKEN_CONTEXT = 0, 1, 2, 3
NUM_TOKEN_TYPES = 4


@dataclasses.dataclass
class EventSequences:
    """Chronological per-user event sequences in jagged form."""

    offsets: np.ndarray  # int64 [U + 1], offsets[0] == 0
    items: np.ndarray  # int32 [T], 1..num_items
    actions: np.ndarray  # int32 [T], index into the data set's action names
    timestamps: np.ndarray  # int64 [T], seconds (monotone non-decreasing per user)
    watch_ratio: np.ndarray  # float32 [T] in [0, 1]; 0 where the source has none
    user_index: np.ndarray  # int32 [U], row into Dataset.user_ids / user_features

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int32)
        self.actions = np.asarray(self.actions, dtype=np.int32)
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64)
        self.watch_ratio = np.asarray(self.watch_ratio, dtype=np.float32)
        self.user_index = np.asarray(self.user_index, dtype=np.int32)
        n = int(self.offsets[-1]) if len(self.offsets) else 0
        for name in ("items", "actions", "timestamps", "watch_ratio"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"EventSequences.{name} has {len(getattr(self, name))} values, offsets say {n}")
        if len(self.user_index) != len(self.offsets) - 1:
            raise ValueError("EventSequences.user_index must have one entry per sequence")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    def row(self, u: int) -> dict[str, np.ndarray]:
        s, e = int(self.offsets[u]), int(self.offsets[u + 1])
        return {
            "items": self.items[s:e],
            "actions": self.actions[s:e],
            "timestamps": self.timestamps[s:e],
            "watch_ratio": self.watch_ratio[s:e],
        }

    @classmethod
    def from_lists(
        cls,
        items: list[np.ndarray],
        actions: list[np.ndarray] | None = None,
        timestamps: list[np.ndarray] | None = None,
        watch_ratio: list[np.ndarray] | None = None,
        user_index: np.ndarray | None = None,
    ) -> "EventSequences":
        lengths = np.array([len(x) for x in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def flat(parts, dtype, default):
            if parts is None:
                return np.full(int(offsets[-1]), default, dtype=dtype)
            return np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.zeros(0, dtype)

        if timestamps is None:  # sources without time: one "second" per event keeps order
            timestamps = [np.arange(n, dtype=np.int64) for n in lengths]
        return cls(
            offsets=offsets,
            items=flat(items, np.int32, 0),
            actions=flat(actions, np.int32, 0),
            timestamps=flat(timestamps, np.int64, 0),
            watch_ratio=flat(watch_ratio, np.float32, 0.0),
            user_index=np.arange(len(items), dtype=np.int32) if user_index is None else user_index,
        )

    def slice_each(self, start: np.ndarray, stop: np.ndarray) -> "EventSequences":
        """Per-user sub-ranges ``[start[u], stop[u])`` (indices relative to each user)."""
        start = np.asarray(start, dtype=np.int64)
        stop = np.asarray(stop, dtype=np.int64)
        if len(start) != len(self) or len(stop) != len(self):
            raise ValueError("slice_each needs one start and one stop per sequence")
        new_len = np.maximum(stop - start, 0)
        offsets = np.concatenate([[0], np.cumsum(new_len)]).astype(np.int64)
        idx = np.concatenate(
            [np.arange(self.offsets[u] + start[u], self.offsets[u] + start[u] + new_len[u]) for u in range(len(self))]
        ).astype(np.int64) if len(self) else np.zeros(0, np.int64)
        return EventSequences(
            offsets=offsets,
            items=self.items[idx],
            actions=self.actions[idx],
            timestamps=self.timestamps[idx],
            watch_ratio=self.watch_ratio[idx],
            user_index=self.user_index.copy(),
        )

    def select(self, rows: np.ndarray) -> "EventSequences":
        """A subset of users, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        idx = (
            np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]).astype(np.int64)
            if len(rows)
            else np.zeros(0, np.int64)
        )
        return EventSequences(
            offsets=offsets,
            items=self.items[idx],
            actions=self.actions[idx],
            timestamps=self.timestamps[idx],
            watch_ratio=self.watch_ratio[idx],
            user_index=self.user_index[rows],
        )


@dataclasses.dataclass
class ItemFeatures:
    """Content features per item, row 0 is padding (all zeros)."""

    category: np.ndarray  # int32 [N + 1], 0 = unknown
    tags: np.ndarray  # int32 [N + 1, max_tags], 0 = no tag
    numeric: np.ndarray  # float32 [N + 1, F]
    num_categories: int
    num_tags: int

    def dense_matrix(self) -> np.ndarray:
        """One float vector per item (category one-hot, tag multi-hot, numeric), row 0 padding."""
        n = len(self.category)
        cat = np.zeros((n, self.num_categories + 1), np.float32)
        cat[np.arange(n), self.category] = 1.0
        tag = np.zeros((n, self.num_tags + 1), np.float32)
        rows = np.repeat(np.arange(n), self.tags.shape[1])
        tag[rows, self.tags.reshape(-1)] = 1.0
        tag[:, 0] = 0.0
        cat[:, 0] = 0.0
        out = np.concatenate([cat, tag, self.numeric.astype(np.float32)], axis=1)
        out[0] = 0.0
        return out


@dataclasses.dataclass
class Dataset:
    """A loaded data set: sequences plus everything needed to map ids back to the world."""

    name: str
    sequences: EventSequences
    num_items: int
    item_ids: np.ndarray  # object [N + 1]: external id of internal item i (index 0 = "<pad>")
    user_ids: np.ndarray  # object [num_users]: external user ids
    action_names: tuple[str, ...] = ACTIONS
    item_features: ItemFeatures | None = None
    user_features: np.ndarray | None = None  # float32 [num_users, P]
    has_timestamps: bool = True
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    def item_popularity(self, sequences: EventSequences | None = None) -> np.ndarray:
        """Interaction counts per internal item id (index 0 = padding, count 0)."""
        seqs = self.sequences if sequences is None else sequences
        return np.bincount(seqs.items, minlength=self.num_items + 1).astype(np.int64)

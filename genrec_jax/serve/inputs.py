"""From a request's history to the model's padded input arrays (host side, numpy only).

The same conventions as ``genrec_jax.data.sequences.collate_eval``, so a served request
sees exactly what evaluation fed the model:

* the most recent ``max_len`` events are the input window;
* timestamps are relative to the first event of the window (int32 seconds);
* token i's query timestamp is event i + 1's time, and the last token's is the request
  time (the moment the next event is predicted);
* events without timestamps get their index (one "second" per event), as data sets
  without time are loaded.

``pad_batch`` is public so the ONNX export's parity checks build identical inputs.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from genrec_jax.serve.errors import RequestError


@dataclasses.dataclass(frozen=True)
class History:
    """One user's chronological events in internal ids, and the request time."""

    items: np.ndarray  # int32 [n], 1..num_items
    actions: np.ndarray  # int32 [n]
    timestamps: np.ndarray  # int64 [n], absolute seconds, non-decreasing
    request_ts: int  # absolute seconds, >= timestamps[-1]

    def __len__(self) -> int:
        return len(self.items)

    def window(self, max_len: int) -> "History":
        """The most recent ``max_len`` events (the model's input)."""
        if len(self) <= max_len:
            return self
        return History(self.items[-max_len:], self.actions[-max_len:], self.timestamps[-max_len:], self.request_ts)

    @classmethod
    def from_arrays(cls, items, actions=None, timestamps=None, request_ts: int | None = None) -> "History":
        """In-process construction from internal ids (benchmarks, parity checks)."""
        items = np.asarray(items, np.int32)
        n = len(items)
        actions = np.zeros(n, np.int32) if actions is None else np.asarray(actions, np.int32)
        timestamps = np.arange(n, dtype=np.int64) if timestamps is None else np.asarray(timestamps, np.int64)
        if request_ts is None:
            request_ts = int(timestamps[-1]) if n else 0
        return cls(items, actions, timestamps, int(request_ts))


class Catalog:
    """External item ids <-> internal ids, and action names <-> action ids.

    Internal ids ``1..num_trained`` are the checkpoint's items; cold-start items registered
    at serving time follow (they get embeddings from their semantic neighbours, so they can
    be recommended, ranked and appear in histories like any other).
    """

    def __init__(self, item_ids: Sequence[str], action_names: Sequence[str]):
        self._external = [str(x) for x in item_ids]  # index 0 = padding
        self._index = {x: i for i, x in enumerate(self._external) if i > 0}
        self.num_trained = len(self._external) - 1
        self.action_names = tuple(action_names) or ("view",)
        self._action_index = {a: i for i, a in enumerate(self.action_names)}
        self.default_action = self._action_index.get("view", 0)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Items a client can name (trained + cold-start)."""
        return len(self._external) - 1

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._index

    def internal(self, item_id: Any, field: str) -> int:
        key = _item_key(item_id, field)
        idx = self._index.get(key)
        if idx is None:
            raise _unknown_item(field, key)
        return idx

    def internals(self, item_ids: Sequence[Any], field: str) -> np.ndarray:
        """Internal ids (int32) of a list of external ids; errors name ``field[i]``."""
        index = self._index
        out = []
        for i, key in enumerate(item_ids):
            if type(key) is not str:
                key = _item_key(key, f"{field}[{i}]")
            idx = index.get(key)
            if idx is None:
                raise _unknown_item(f"{field}[{i}]", key)
            out.append(idx)
        return np.asarray(out, np.int32)

    def parse_events(self, events: Sequence[Mapping[str, Any]], field: str) -> tuple[list, list, list]:
        """Internal item ids, action ids and raw timestamps of a request's events: the
        per-request hot loop, so it names the field only when something is wrong."""
        index, actions = self._index, self._action_index  # one snapshot (add() swaps whole dicts)
        default = self.default_action
        items_out, actions_out, stamps = [], [], []
        for i, ev in enumerate(events):
            key = ev.get("item_id")
            if type(key) is not str:  # integers (and wrong types) take the checked path
                key = _item_key(key, f"{field}[{i}].item_id")
            idx = index.get(key)
            if idx is None:
                raise _unknown_item(f"{field}[{i}].item_id", key)
            items_out.append(idx)
            name = ev.get("action")
            if name is None:
                actions_out.append(default)
            else:
                a = actions.get(name) if isinstance(name, str) else None
                if a is None:
                    raise self._unknown_action(f"{field}[{i}].action", name)
                actions_out.append(a)
            stamps.append(ev.get("timestamp"))
        return items_out, actions_out, stamps

    def external(self, idx: int) -> str:
        return self._external[idx]

    def externals(self, ids: np.ndarray) -> list[str]:
        ext = self._external
        return [ext[int(i)] for i in ids]

    def action(self, name: Any, field: str) -> int:
        if name is None:
            return self.default_action
        idx = self._action_index.get(name) if isinstance(name, str) else None
        if idx is None:
            raise self._unknown_action(field, name)
        return idx

    def _unknown_action(self, field: str, name: Any) -> RequestError:
        return RequestError(field, f"unknown action {name!r}; one of {list(self.action_names)}")

    def add(self, item_ids: Sequence[str]) -> list[int]:
        """Register new external ids (cold start); returns their internal ids."""
        with self._lock:
            dup = [x for x in item_ids if x in self._index]
            if dup:
                raise RequestError("items", f"item(s) already in the catalogue: {dup[:5]}")
            start = len(self._external)
            ext = self._external + list(item_ids)  # copy-on-write: readers never see a half list
            index = dict(self._index)
            index.update({x: start + i for i, x in enumerate(item_ids)})
            self._external, self._index = ext, index
            return list(range(start, start + len(item_ids)))

    def page(self, offset: int, limit: int) -> list[tuple[int, str]]:
        ext = self._external
        lo = 1 + offset
        return [(i, ext[i]) for i in range(lo, min(lo + limit, len(ext)))]


def _unknown_item(field: str, key: str) -> RequestError:
    return RequestError(field, f"unknown item {key!r} (GET /v1/items lists the catalogue)")


def _item_key(item_id: Any, field: str) -> str:
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise RequestError(field, f"must be a string or an integer, got {type(item_id).__name__}")
    return str(item_id)


def parse_history(events: Sequence[Mapping[str, Any]], catalog: Catalog, *, max_history_len: int,
                  request_ts: int | None = None, field: str = "history") -> History:
    """Validate a request's events (dicts with ``item_id``, ``action``?, ``timestamp``?).

    Raises:
        RequestError: naming the field, for an empty or too long history, unknown items or
            actions, timestamps on some events only, decreasing timestamps, or a request
            time before the last event.
    """
    n = len(events)
    if n == 0:
        raise RequestError(field, "must hold at least one event")
    if n > max_history_len:
        raise RequestError(field, f"{n} events; at most {max_history_len} per request")
    item_list, action_list, stamps = catalog.parse_events(events, field)
    items = np.asarray(item_list, np.int32)
    actions = np.asarray(action_list, np.int32)
    have = [s is not None for s in stamps]
    if any(have) and not all(have):
        first_missing = have.index(False)
        raise RequestError(f"{field}[{first_missing}].timestamp", "either every event has a timestamp or none does")
    if all(have):
        ts = np.asarray(stamps, np.int64)
        bad = np.nonzero(np.diff(ts) < 0)[0]
        if len(bad):
            raise RequestError(f"{field}[{bad[0] + 1}].timestamp", "timestamps must be non-decreasing (oldest first)")
        if (ts < 0).any():
            raise RequestError(f"{field}[{int(np.argmax(ts < 0))}].timestamp", "must be >= 0")
    else:
        ts = np.arange(n, dtype=np.int64)
    req = int(ts[-1]) if request_ts is None else int(request_ts)
    if req < ts[-1]:
        raise RequestError("context.timestamp", f"request time {req} is before the last event ({int(ts[-1])})")
    if req - int(ts[0]) >= 2**31:
        raise RequestError("context.timestamp", "the history spans more than 2^31 seconds")
    return History(items, actions, ts, req)


def pad_batch(histories: Sequence[History | None], batch_size: int, seq_len: int,
              max_len: int) -> dict[str, np.ndarray]:
    """Padded encoder inputs for ``histories`` (None = an empty filler row).

    Returns int32 arrays ``items, actions, timestamps, query_timestamps`` [batch_size,
    seq_len] and ``lengths`` [batch_size]; each row holds the most recent
    ``min(max_len, seq_len)`` events, left-aligned.
    """
    if len(histories) > batch_size:
        raise ValueError(f"{len(histories)} histories do not fit a batch of {batch_size}")
    out = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("items", "actions", "timestamps", "query_timestamps")}
    lengths = np.zeros(batch_size, np.int32)
    for r, h in enumerate(histories):
        if h is None or len(h) == 0:
            continue
        w = h.window(min(max_len, seq_len))
        n = len(w)
        origin = int(w.timestamps[0])
        rel = (w.timestamps - origin).astype(np.int32)
        out["items"][r, :n] = w.items
        out["actions"][r, :n] = w.actions
        out["timestamps"][r, :n] = rel
        out["query_timestamps"][r, :n - 1] = rel[1:]
        out["query_timestamps"][r, n - 1] = w.request_ts - origin
        lengths[r] = n
    out["lengths"] = lengths
    return out


def pick_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n (None when n exceeds every bucket)."""
    for b in buckets:
        if b >= n:
            return b
    return None


def chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split n rows into (start, stop, bucket) pieces: full largest buckets, then the
    smallest bucket that holds the rest."""
    out, top, i = [], buckets[-1], 0
    while n - i > top:
        out.append((i, i + top, top))
        i += top
    if n - i > 0:
        out.append((i, n, pick_bucket(n - i, buckets)))
    return out

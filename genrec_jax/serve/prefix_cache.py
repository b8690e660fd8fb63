"""Per-user prefix cache: which device K/V slot holds which user's already-encoded history.

The K/V arrays themselves live on the device, in the engine's slot pool (one slot per
user, ``max_len + max(extend_buckets)`` tokens per layer); this module is the host-side
bookkeeping: an LRU map user -> (slot, the events the slot encodes).

Why reuse is exact: HSTU attention is causal and normalised by a constant (or by the causal
key count), so token j's keys and values depend on tokens 0..j only -- with one exception:
the last cached token's own query timestamp was the previous request's time, not the time
of the event that followed it, and its deeper-layer K/V depend on that. So a hit reuses the
first ``c - 1`` cached tokens and recomputes the last one together with the new events.

A hit needs the request's input window to start with the cached events (same items,
actions and absolute timestamps). A history longer than the model's ``max_len`` slides its
window with every new event, which moves every position: that is a miss (full prefill).
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from genrec_jax.serve.inputs import History


@dataclasses.dataclass
class Entry:
    slot: int
    window: History  # the events whose K/V the slot holds (positions 0..len-1)


@dataclasses.dataclass(frozen=True)
class Lookup:
    slot: int
    start: int  # tokens reused from the slot (0 = encode the whole window)
    hit: bool


class PrefixCache:
    """LRU over ``capacity`` slots numbered ``first_slot .. first_slot + capacity - 1``.

    Not a general cache: ``lookup`` reserves a slot for the request and the caller must
    ``commit`` (after the device write succeeded) or ``discard`` it.
    """

    def __init__(self, capacity: int, first_slot: int):
        self.capacity = capacity
        self._free = list(range(first_slot + capacity - 1, first_slot - 1, -1))
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def lookup(self, user_id: str, window: History, max_new: int) -> Lookup:
        """Reserve ``user_id``'s slot for encoding ``window``: reuse the cached prefix when
        it matches and leaves at most ``max_new`` tokens to compute; otherwise a fresh
        slot (evicting the least recently used user when none is free)."""
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None:
                self._entries.move_to_end(user_id)
                start = reusable_prefix(entry.window, window)
                if start > 0 and len(window) - start <= max_new:
                    self.hits += 1
                    return Lookup(entry.slot, start, True)
                self.misses += 1
                return Lookup(entry.slot, 0, False)
            self.misses += 1
            if self._free:
                slot = self._free.pop()
            else:
                _, victim = self._entries.popitem(last=False)
                self.evictions += 1
                slot = victim.slot
            # Placeholder until commit: the slot's content is being rewritten.
            self._entries[user_id] = Entry(slot, History.from_arrays(np.zeros(0, np.int32)))
            return Lookup(slot, 0, False)

    def commit(self, user_id: str, slot: int, window: History) -> None:
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None and entry.slot == slot:
                entry.window = window

    def discard(self, user_id: str) -> None:
        """Forget a user (e.g. the batch that was writing their slot failed)."""
        with self._lock:
            entry = self._entries.pop(user_id, None)
            if entry is not None:
                self._free.append(entry.slot)

    def clear(self) -> None:
        with self._lock:
            for uid in list(self._entries):
                self._free.append(self._entries.pop(uid).slot)


def reusable_prefix(cached: History, window: History) -> int:
    """Tokens of ``cached`` that ``window`` may reuse: ``c = len(cached) - 1`` when the
    window starts with the same first c events and has at least one more (the cached last
    token is always recomputed, see the module docstring), else 0."""
    c = len(cached) - 1
    if c < 1 or len(window) <= c:
        return 0
    same = (np.array_equal(cached.items[:c], window.items[:c])
            and np.array_equal(cached.actions[:c], window.actions[:c])
            and np.array_equal(cached.timestamps[:c], window.timestamps[:c]))
    return c if same else 0

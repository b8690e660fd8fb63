"""Leave-one-out splitting and turning event sequences into padded model batches.

Protocol (SASRec / HSTU / TIGER): for every user the last event is the test target, the
second-to-last the validation target, the rest is training data. Inputs are truncated to
the most recent ``max_len`` events.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genrec_jax.data.types import EventSequences


@dataclasses.dataclass
class EvalSet:
    """Histories and the one held-out next event per user."""

    history: EventSequences
    target_items: np.ndarray  # int32 [U]
    target_actions: np.ndarray  # int32 [U]
    target_timestamps: np.ndarray  # int64 [U]
    target_watch: np.ndarray  # float32 [U]

    def __len__(self) -> int:
        return len(self.target_items)


@dataclasses.dataclass
class LeaveOneOut:
    train: EventSequences  # all but the last two events of each user
    valid: EvalSet  # history = train part, target = second-to-last event
    test: EvalSet  # history = all but the last event, target = last event


def _eval_set(seqs: EventSequences, rows: np.ndarray, hist_stop: np.ndarray) -> EvalSet:
    """Users ``rows`` with history ``[0, hist_stop)`` and target at index ``hist_stop``."""
    sub = seqs.select(rows)
    stop = hist_stop[rows]
    hist = sub.slice_each(np.zeros(len(rows), np.int64), stop)
    tgt = sub.offsets[:-1] + stop
    return EvalSet(
        history=hist,
        target_items=sub.items[tgt],
        target_actions=sub.actions[tgt],
        target_timestamps=sub.timestamps[tgt],
        target_watch=sub.watch_ratio[tgt],
    )


def leave_one_out(seqs: EventSequences, min_len: int = 3) -> LeaveOneOut:
    """Chronological leave-one-out split. Users with fewer than ``min_len`` events
    (the minimum for a train, a validation and a test event) are dropped from evaluation
    but keep their events for training."""
    lengths = seqs.lengths
    train = seqs.slice_each(np.zeros(len(seqs), np.int64), np.maximum(lengths - 2, 0))
    ok = np.nonzero(lengths >= min_len)[0]
    return LeaveOneOut(
        train=train,
        valid=_eval_set(seqs, ok, lengths - 2),
        test=_eval_set(seqs, ok, lengths - 1),
    )


# --------------------------------------------------------------------------- collation


def _pad(rows: list[np.ndarray], width: int, dtype, fill=0) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def collate_train(seqs: EventSequences, rows: np.ndarray, pad_len: int, max_len: int) -> dict[str, np.ndarray]:
    """Next-item training batch: inputs are events ``t``, targets events ``t + 1``.

    ``rows`` may contain -1 for empty filler rows (length 0, contribute no loss), which
    keeps every batch the same size without dropping data.
    """
    cols: dict[str, list] = {k: [] for k in ("items", "actions", "ts", "qts", "tgt", "tact", "twatch")}
    lengths, users = [], []
    for r in rows:
        if r < 0:
            for v in cols.values():
                v.append(np.zeros(0))
            lengths.append(0)
            users.append(0)
            continue
        ev = seqs.row(int(r))
        items, acts, ts, wr = ev["items"], ev["actions"], ev["timestamps"], ev["watch_ratio"]
        n_in = min(len(items) - 1, max_len, pad_len)
        if n_in <= 0:
            for v in cols.values():
                v.append(np.zeros(0))
            lengths.append(0)
            users.append(int(seqs.user_index[r]))
            continue
        sl_in = slice(len(items) - 1 - n_in, len(items) - 1)
        sl_tg = slice(len(items) - n_in, len(items))
        origin = ts[sl_in][0]
        cols["items"].append(items[sl_in])
        cols["actions"].append(acts[sl_in])
        cols["ts"].append(ts[sl_in] - origin)
        cols["qts"].append(ts[sl_tg] - origin)
        cols["tgt"].append(items[sl_tg])
        cols["tact"].append(acts[sl_tg])
        cols["twatch"].append(wr[sl_tg])
        lengths.append(n_in)
        users.append(int(seqs.user_index[r]))
    return {
        "items": _pad(cols["items"], pad_len, np.int32),
        "actions": _pad(cols["actions"], pad_len, np.int32),
        "timestamps": _pad(cols["ts"], pad_len, np.int32),
        "query_timestamps": _pad(cols["qts"], pad_len, np.int32),
        "targets": _pad(cols["tgt"], pad_len, np.int32),
        "target_actions": _pad(cols["tact"], pad_len, np.int32),
        "target_watch": _pad(cols["twatch"], pad_len, np.float32),
        "lengths": np.asarray(lengths, np.int32),
        "user_index": np.asarray(users, np.int32),
    }


def collate_eval(es: EvalSet, rows: np.ndarray, pad_len: int) -> dict[str, np.ndarray]:
    """Evaluation batch: the last ``pad_len`` history events, the held-out target, and the
    full (untruncated) history item ids for optional exclusion. ``rows`` may hold -1 fillers."""
    items, acts, ts, qts, lengths, full_hist = [], [], [], [], [], []
    targets, tact, twatch, valid, users = [], [], [], [], []
    for r in rows:
        if r < 0:
            for lst in (items, acts, ts, qts, full_hist):
                lst.append(np.zeros(0))
            lengths.append(0)
            targets.append(0)
            tact.append(0)
            twatch.append(0.0)
            valid.append(False)
            users.append(0)
            continue
        ev = es.history.row(int(r))
        n = min(len(ev["items"]), pad_len)
        sl = slice(len(ev["items"]) - n, len(ev["items"]))
        t = ev["timestamps"][sl]
        target_ts = int(es.target_timestamps[r])
        origin = t[0] if n else target_ts
        items.append(ev["items"][sl])
        acts.append(ev["actions"][sl])
        ts.append(t - origin)
        qts.append(np.concatenate([t[1:], [target_ts]]) - origin if n else np.zeros(0))
        lengths.append(n)
        full_hist.append(ev["items"])
        targets.append(int(es.target_items[r]))
        tact.append(int(es.target_actions[r]))
        twatch.append(float(es.target_watch[r]))
        valid.append(n > 0)
        users.append(int(es.history.user_index[r]))
    return {
        "items": _pad(items, pad_len, np.int32),
        "actions": _pad(acts, pad_len, np.int32),
        "timestamps": _pad(ts, pad_len, np.int32),
        "query_timestamps": _pad(qts, pad_len, np.int32),
        "lengths": np.asarray(lengths, np.int32),
        "target_items": np.asarray(targets, np.int32),
        "target_actions": np.asarray(tact, np.int32),
        "target_watch": np.asarray(twatch, np.float32),
        "valid_rows": np.asarray(valid, bool),
        "user_index": np.asarray(users, np.int32),
        "history_items": full_hist,  # ragged, host side only
    }

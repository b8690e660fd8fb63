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


@dataclasses.dataclass(frozen=True)
class CollateOptions:
    """What a batch carries beyond the plain next-item inputs.

    num_candidates: M-FALCON training: the last ``num_candidates`` events of a row become
        candidate tokens (item known, action unknown) whose actions are the ranking labels.
    long_window / max_long_tokens: multi-scale encoder: events older than the most recent
        ``short_len`` are grouped into windows of ``long_window`` events (the most recent
        ``max_long_tokens`` windows are kept) and pooled by the model.
    context: add request-context ids (hour of day, weekday of the request time).
    """

    num_candidates: int = 0
    unknown_action: int = 0
    short_len: int = 0
    long_window: int = 0
    max_long_tokens: int = 0
    context: bool = False
    user_features: np.ndarray | None = None

    @property
    def multiscale(self) -> bool:
        return self.short_len > 0 and self.long_window > 0 and self.max_long_tokens > 0

    def __hash__(self) -> int:
        return id(self)


def _pad(rows: list[np.ndarray], width: int, dtype, fill=0) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        r = np.asarray(r)
        out[i, : len(r)] = r
    return out


def request_context(abs_ts: int) -> np.ndarray:
    """Context ids of a request at unix time ``abs_ts``: [hour of day, weekday]."""
    return np.array([(abs_ts // 3600) % 24, (abs_ts // 86400 + 3) % 7], np.int32)  # 1970-01-01 was a Thursday


def _long_windows(items, actions, ts, end: int, opts: CollateOptions, origin: int):
    """Windows of the events before index ``end`` (oldest window first, most recent kept)."""
    w, cap = opts.long_window, opts.max_long_tokens
    li = np.zeros((cap, w), np.int32)
    la = np.zeros((cap, w), np.int32)
    lt = np.zeros(cap, np.int64)
    start = max(0, end - w * cap)
    n_ev = end - start
    n_win = -(-n_ev // w) if n_ev > 0 else 0
    for k in range(n_win):  # window k covers events [end - (n_win - k) * w, ...) clipped at start
        hi = end - (n_win - 1 - k) * w
        lo = max(start, hi - w)
        li[k, : hi - lo] = items[lo:hi]
        la[k, : hi - lo] = actions[lo:hi]
        lt[k] = ts[hi - 1] - origin
    return li, la, lt, n_win


def _empty_windows(opts: CollateOptions):
    shape = (opts.max_long_tokens, opts.long_window)
    return np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(opts.max_long_tokens, np.int64), 0


def _append_windows(lists, windows) -> None:
    for lst, value in zip(lists, windows):
        lst.append(value)


def collate_train(seqs: EventSequences, rows: np.ndarray, pad_len: int, max_len: int,
                  opts: CollateOptions | None = None) -> dict[str, np.ndarray]:
    """Next-item training batch: inputs are events ``t``, targets events ``t + 1``.

    ``rows`` may contain -1 for empty filler rows (length 0, contribute no loss), which
    keeps every batch the same size without dropping data. With ``opts.num_candidates``
    the last M events of a row are appended as M-FALCON candidate tokens instead.
    """
    opts = opts or CollateOptions()
    keys = ("items", "actions", "ts", "qts", "tgt", "tact", "twatch", "cact", "cwatch")
    cols: dict[str, list] = {k: [] for k in keys}
    lengths, users, ntargets, ctx, li_all, la_all, lt_all, nlong = [], [], [], [], [], [], [], []
    short_cap = min(pad_len, max_len, opts.short_len) if opts.multiscale else min(pad_len, max_len)
    for r in rows:
        ev = seqs.row(int(r)) if r >= 0 else None
        L = len(ev["items"]) if ev is not None else 0
        m = min(opts.num_candidates, max(L - 2, 0))
        n_hist = min(L - 1 - m, short_cap - m) if L - m >= 2 else 0
        if n_hist <= 0:
            for v in cols.values():
                v.append(np.zeros(0))
            lengths.append(0)
            ntargets.append(0)
            users.append(int(seqs.user_index[r]) if r >= 0 else 0)
            ctx.append(np.zeros(2, np.int32))
            if opts.multiscale:
                _append_windows((li_all, la_all, lt_all, nlong), _empty_windows(opts))
            continue
        items, acts, ts, wr = ev["items"], ev["actions"], ev["timestamps"], ev["watch_ratio"]
        c0 = L - m  # first candidate (== L when m == 0)
        h0 = c0 - 1 - n_hist  # first history input
        sl_in = slice(h0, c0 - 1)
        sl_tg = slice(h0 + 1, c0)
        origin = ts[h0]
        req_ts = ts[c0 - 1] if m == 0 else ts[c0]
        cand_ts = np.full(m, ts[c0] - origin) if m else np.zeros(0, np.int64)
        cols["items"].append(np.concatenate([items[sl_in], items[c0:]]))
        cols["actions"].append(np.concatenate([acts[sl_in], np.full(m, opts.unknown_action)]))
        cols["ts"].append(np.concatenate([ts[sl_in] - origin, cand_ts]))
        cols["qts"].append(np.concatenate([ts[sl_tg] - origin, cand_ts]))
        cols["tgt"].append(np.concatenate([items[sl_tg], np.zeros(m)]))
        cols["tact"].append(np.concatenate([acts[sl_tg], np.zeros(m)]))
        cols["twatch"].append(np.concatenate([wr[sl_tg], np.zeros(m)]))
        cols["cact"].append(np.concatenate([np.zeros(n_hist), acts[c0:]]))
        cols["cwatch"].append(np.concatenate([np.zeros(n_hist), wr[c0:]]))
        lengths.append(n_hist + m)
        ntargets.append(m)
        users.append(int(seqs.user_index[r]))
        ctx.append(request_context(int(req_ts)))
        if opts.multiscale:
            _append_windows((li_all, la_all, lt_all, nlong), _long_windows(items, acts, ts, h0, opts, origin))
    batch = {
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
    if opts.num_candidates:
        batch["num_targets"] = np.asarray(ntargets, np.int32)
        batch["cand_actions"] = _pad(cols["cact"], pad_len, np.int32)
        batch["cand_watch"] = _pad(cols["cwatch"], pad_len, np.float32)
    _add_multiscale(batch, opts, ctx, li_all, la_all, lt_all, nlong)
    return batch


def _add_multiscale(batch, opts: CollateOptions, ctx, li_all, la_all, lt_all, nlong) -> None:
    if opts.context:
        batch["context"] = np.stack(ctx).astype(np.int32)
    if opts.user_features is not None:
        uf = opts.user_features[batch["user_index"]].astype(np.float32)
        batch["user_features"] = np.where(batch["lengths"][:, None] > 0, uf, 0.0).astype(np.float32)
    if opts.multiscale:
        batch["long_items"] = np.stack(li_all).astype(np.int32)
        batch["long_actions"] = np.stack(la_all).astype(np.int32)
        batch["long_timestamps"] = np.stack(lt_all).astype(np.int32)
        batch["num_long"] = np.asarray(nlong, np.int32)


def collate_eval(es: EvalSet, rows: np.ndarray, pad_len: int, opts: CollateOptions | None = None) -> dict[str, np.ndarray]:
    """Evaluation batch: the last ``pad_len`` history events, the held-out target, and the
    full (untruncated) history item ids for optional exclusion. ``rows`` may hold -1 fillers."""
    opts = opts or CollateOptions()
    items, acts, ts, qts, lengths, full_hist = [], [], [], [], [], []
    targets, tact, twatch, valid, users, ctx = [], [], [], [], [], []
    li_all, la_all, lt_all, nlong = [], [], [], []
    short_cap = min(pad_len, opts.short_len) if opts.multiscale else pad_len
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
            ctx.append(np.zeros(2, np.int32))
            if opts.multiscale:
                _append_windows((li_all, la_all, lt_all, nlong), _empty_windows(opts))
            continue
        ev = es.history.row(int(r))
        L = len(ev["items"])
        n = min(L, short_cap)
        sl = slice(L - n, L)
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
        ctx.append(request_context(target_ts))
        if opts.multiscale:
            _append_windows((li_all, la_all, lt_all, nlong),
                            _long_windows(ev["items"], ev["actions"], ev["timestamps"], L - n, opts, origin))
    batch = {
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
    _add_multiscale(batch, opts, ctx, li_all, la_all, lt_all, nlong)
    return batch

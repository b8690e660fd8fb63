"""Length-bucketed, deterministically shuffled training batches with a resumable position.

Each epoch's plan depends only on (seed, epoch): rows are shuffled, grouped by the padded
length bucket their input falls in, cut into fixed-size batches (a bucket's last batch is
filled with empty rows instead of dropping data), and the batch order is shuffled. The
loader's position is (epoch, index), so a resumed run sees exactly the batches an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genrec_jax.data.sequences import CollateOptions, EvalSet, collate_eval, collate_train
from genrec_jax.data.types import EventSequences


def bucket_sizes_for(max_len: int, bucket_sizes: list[int]) -> list[int]:
    """Padded lengths in use: the configured ones below ``max_len``, then ``max_len``."""
    return sorted({b for b in bucket_sizes if b < max_len} | {max_len})


@dataclasses.dataclass
class LoaderState:
    epoch: int = 0
    index: int = 0  # next batch within the epoch

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class TrainLoader:
    def __init__(self, seqs: EventSequences, *, batch_size: int, max_len: int, bucket_sizes: list[int], seed: int,
                 options: CollateOptions | None = None):
        self.seqs, self.batch_size, self.max_len, self.seed = seqs, batch_size, max_len, seed
        self.options = options or CollateOptions()
        cap = min(max_len, self.options.short_len) if self.options.multiscale else max_len
        self.buckets = bucket_sizes_for(cap, bucket_sizes)
        in_len = np.minimum(np.maximum(seqs.lengths - 1, 0), cap)
        self.rows = np.nonzero(in_len > 0)[0]
        if len(self.rows) == 0:
            raise ValueError("no training sequences with at least two events")
        self.row_bucket = np.searchsorted(self.buckets, in_len[self.rows])
        self.state = LoaderState()
        self._plan_epoch = -1
        self._plan: list[tuple[int, np.ndarray]] = []

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(pad_len, rows)] for one epoch; rows hold -1 fillers in a bucket's last batch."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.rows))
        plan = []
        for b, size in enumerate(self.buckets):
            members = self.rows[perm[self.row_bucket[perm] == b]]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s : s + self.batch_size]
                if len(chunk) < self.batch_size:
                    chunk = np.concatenate([chunk, np.full(self.batch_size - len(chunk), -1, np.int64)])
                plan.append((size, chunk))
        order = rng.permutation(len(plan))
        return [plan[i] for i in order]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._get_plan(self.state.epoch))

    def _get_plan(self, epoch: int):
        if epoch != self._plan_epoch:
            self._plan, self._plan_epoch = self.epoch_plan(epoch), epoch
        return self._plan

    def next_batch(self) -> dict[str, np.ndarray]:
        plan = self._get_plan(self.state.epoch)
        if self.state.index >= len(plan):
            self.state = LoaderState(self.state.epoch + 1, 0)
            plan = self._get_plan(self.state.epoch)
        pad_len, rows = plan[self.state.index]
        self.state = LoaderState(self.state.epoch, self.state.index + 1)
        return collate_train(self.seqs, rows, pad_len, self.max_len, self.options)

    def state_dict(self) -> dict[str, int]:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        self.state = LoaderState(int(d["epoch"]), int(d["index"]))


def eval_batches(es: EvalSet, *, batch_size: int, max_len: int, max_users: int = 0, seed: int = 0,
                 options: CollateOptions | None = None):
    """Fixed-shape evaluation batches over (a deterministic subset of) the users."""
    rows = np.arange(len(es))
    if 0 < max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), -1, np.int64)])
        yield collate_eval(es, chunk, max_len, options)

"""Metrics log: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard when
tensorboardX is installed (``pip install 'genrec-jax[logging]'``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _plain(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self._tb = None

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                try:
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
                except (TypeError, ValueError):
                    pass

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]

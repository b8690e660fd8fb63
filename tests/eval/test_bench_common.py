"""bench.common.summarize_trace on a hand-written trace in the profiler's perfetto format."""

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import summarize_trace  # noqa: E402


def _write_trace(path: Path, events: list[dict]) -> None:
    path.mkdir(parents=True)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_device_time_is_grouped_per_step_and_host_events_are_ignored(tmp_path):
    ev = []
    for _ in range(2):  # two steps
        ev += [{"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_128x128", "dur": 300.0, "args": {"hlo_op": "cb"}},
               {"ph": "X", "pid": 1, "name": "input_scatter_fusion_3", "dur": 100.0, "args": {"hlo_op": "cb"}},
               {"ph": "X", "pid": 2, "name": "PjitFunction(step)", "dur": 5000.0}]
    _write_trace(tmp_path / "plugins" / "profile" / "run", ev)
    rows = summarize_trace(tmp_path, steps=2)
    classes = {r["name"]: r for r in rows if r["kind"] == "class"}
    assert set(classes) == {"matmul (cuBLAS/cutlass)", "scatter"}
    assert classes["matmul (cuBLAS/cutlass)"]["ms_per_step"] == pytest.approx(0.3)
    assert classes["scatter"]["share"] == pytest.approx(0.25)
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert kernels[0]["kernel"] == "nvjet_sm90_tst_128x128" and kernels[0]["calls_per_step"] == 1


def test_no_trace_or_no_device_events_gives_no_rows(tmp_path):
    assert summarize_trace(tmp_path, steps=1) == []
    _write_trace(tmp_path / "cpu", [{"ph": "X", "pid": 2, "name": "ynn_fusion", "dur": 10.0}])
    assert summarize_trace(tmp_path, steps=1) == []

"""What every benchmark script shares: its rows as JSON lines, and matplotlib if present."""

from __future__ import annotations

import json
from pathlib import Path


def write_rows(path: str | None, rows: list[dict]) -> None:
    """``--json PATH``: one JSON object per row (nothing when ``path`` is None)."""
    if not path:
        return
    from genrec_jax.train.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
    print(f"wrote {path}")


def pyplot(path: str):
    """matplotlib.pyplot on the headless backend, or None (with a message) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install 'genrec-jax[plot]')")
        return None
    return plt


def _kernel_class(name: str) -> str:
    n = name.lower()
    if "_hstu_" in n or "interaction" in n:
        return "triton attention/interaction"
    if any(s in n for s in ("gemm", "cutlass", "nvjet", "cublas", "xmma", "sm90_", "wgmma")):
        return "matmul (cuBLAS/cutlass)"
    if "triton" in n:
        return "XLA triton fusion (matmul)"
    if "scatter" in n:
        return "scatter"
    if "sort" in n or "cub" in n:
        return "sort / cub"
    if "reduce" in n or "reduction" in n:
        return "reduction fusion"
    if "copy" in n or "memcpy" in n or "memset" in n or "transpose" in n:
        return "copy / transpose / memset"
    if "fusion" in n or "loop" in n or "input_" in n:
        return "elementwise / loop fusion"
    return "other"


def summarize_trace(log_dir: str | Path, steps: int, top: int = 25) -> list[dict]:
    """Where the device time goes in a ``jax.profiler`` trace written with
    ``create_perfetto_trace=True``: the ``top`` kernels by total time and the time per kernel
    class, in ms per step. Empty when the trace holds no device events (e.g. on CPU)."""
    import collections
    import gzip

    files = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        return []
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in procs.items() if "gpu" in name.lower() or "device" in name.lower()}
    by_kernel: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device:
            args = e.get("args", {})
            key = args.get("hlo_op") or e["name"]
            by_kernel[(key, e["name"])] += e.get("dur", 0.0)
            calls[(key, e["name"])] += 1
    total = sum(by_kernel.values())
    if not total:
        return []
    by_class: collections.Counter = collections.Counter()
    for (_, name), dur in by_kernel.items():
        by_class[_kernel_class(name)] += dur
    rows = [{"kind": "class", "name": c, "ms_per_step": d / 1e3 / steps, "share": d / total}
            for c, d in by_class.most_common()]
    rows += [{"kind": "kernel", "name": k[0], "kernel": k[1][:120], "calls_per_step": calls[k] / steps,
              "ms_per_step": d / 1e3 / steps, "share": d / total} for k, d in by_kernel.most_common(top)]
    return rows


def print_trace_summary(rows: list[dict], title: str) -> None:
    if not rows:
        print(f"{title}: no device events in the trace")
        return
    total = sum(r["ms_per_step"] for r in rows if r["kind"] == "class")
    print(f"\n{title}: device time {total:.1f} ms per step")
    print(f"{'class':<34}{'ms/step':>10}{'share':>8}")
    for r in rows:
        if r["kind"] == "class":
            print(f"{r['name']:<34}{r['ms_per_step']:>10.2f}{100 * r['share']:>7.1f}%")
    print(f"{'kernel (hlo op / name)':<70}{'calls':>7}{'ms/step':>10}{'share':>8}")
    for r in rows:
        if r["kind"] == "kernel":
            label = r["name"] if r["name"] == r["kernel"] else f"{r['name']} / {r['kernel']}"
            print(f"{label[:69]:<70}{r['calls_per_step']:>7.0f}{r['ms_per_step']:>10.2f}{100 * r['share']:>7.1f}%")

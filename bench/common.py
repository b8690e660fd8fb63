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

"""Checkpoints: orbax for the (possibly sharded) train state, JSON for everything else.

A run directory looks like::

    run/
      config.yaml        the full resolved config
      dataset.json       num_items, num_actions, max_len, data set name
      items.json         external id of every internal item id (index 0 = padding)
      item_popularity.npy  training interactions per internal item id (cold-start placement)
      checkpoints/<step>/state, meta     orbax; written to a temporary folder and renamed
      metrics.jsonl, tb/                 logs

orbax finalises a step only after every file is written (temporary directory + rename),
so a crash mid-save never leaves a half checkpoint that ``--resume`` would pick up. Our own
JSON/YAML files are written to a temporary file and ``os.replace``d for the same reason.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def atomic_write(path: str | Path, write, mode: str = "w") -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync,
    then rename over the target: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 2, subdir: str = "checkpoints"):
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / subdir
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, wait: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore onto ``abstract_state`` (ShapeDtypeStructs whose ``sharding`` says where
        each array goes: a different mesh than the one that saved is fine)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta), step

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of ``tree``, optionally with target shardings."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )

"""Load a trained model from a run directory (for serving, export and evaluation)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from genrec_jax.config import Config, MeshConfig, load_config
from genrec_jax.model.recommender import Recommender, build_model
from genrec_jax.sharding import make_mesh
from genrec_jax.train.checkpoint import Checkpointer, read_json


@dataclasses.dataclass
class TrainedModel:
    model: Recommender
    cfg: Config
    info: dict  # dataset.json: name, num_items, num_actions, action_names, max_len, ...
    item_ids: list[str]  # external id of each internal item id (index 0 = padding)
    step: int
    run_dir: Path
    # training interactions per internal item id [N + 1] (item_popularity.npy; None for runs
    # that predate it)
    item_popularity: np.ndarray | None = None


def load_trained(run_dir: str | Path, step: int | None = None) -> TrainedModel:
    """Rebuild the model a run trained and load its (latest) checkpointed parameters.

    Raises FileNotFoundError with what to run when the directory holds no finished run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists() or not (run_dir / "checkpoints").exists():
        raise FileNotFoundError(
            f"{run_dir} is not a training run directory (no config.yaml / checkpoints/); "
            "train one with `python train.py --out DIR` first"
        )
    cfg = load_config(run_dir / "config.yaml")
    info = read_json(run_dir / "dataset.json")
    item_ids = read_json(run_dir / "items.json")
    item_codes = code_sizes = None
    if cfg.model.decoder.enabled:  # the decoder's item -> semantic ID table (not in the train state)
        from genrec_jax.semantic_ids.train_rqvae import load_item_codes, semantic_ids_dir

        item_codes, code_sizes = load_item_codes(semantic_ids_dir(run_dir, cfg.model.decoder.codes_dir))
    model = build_model(cfg.model, num_items=info["num_items"], num_actions=info["num_actions"],
                        max_len=info["max_len"], seed=cfg.train.seed,
                        action_names=tuple(info.get("action_names", ())), item_codes=item_codes,
                        code_sizes=code_sizes)
    from genrec_jax.train.step import StepBuilder  # local: step imports heavy optax machinery

    steps = StepBuilder(model, cfg.train, make_mesh(MeshConfig(data=1), devices=_first_device()))
    ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
    try:
        state, _, step = ckpt.restore(steps.abstract_state(), step)
    finally:
        ckpt.close()
    nnx.update(model, state["params"])
    pop_file = run_dir / "item_popularity.npy"
    pop = np.load(pop_file, allow_pickle=False) if pop_file.is_file() else None
    return TrainedModel(model=model, cfg=cfg, info=info, item_ids=list(item_ids), step=int(step), run_dir=run_dir,
                        item_popularity=pop)


def _first_device():
    import jax

    return [jax.devices()[0]]


def item_index(item_ids: list[str]) -> dict[str, int]:
    """External id -> internal id (padding excluded)."""
    return {str(x): i for i, x in enumerate(item_ids) if i > 0}


def as_numpy_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)) if hasattr(nnx, "to_pure_dict") else {}


__all__ = ["TrainedModel", "load_trained", "item_index", "np"]

"""Stage ``rqvae`` of ``python train.py``: item vectors -> RQ-VAE -> unique semantic IDs.

Writes ``<out>/semantic_ids/``::

    codes.npy          int32 [N + 1, L + 1]  item -> code table (RQ levels + de-dup level;
                                             row 0 = padding, all zeros, never a valid ID)
    code_to_item.npy   int32 [N, L + 2]      every ID (sorted lexicographically) and its item
    meta.json          code sizes (incl. the de-dup level), feature source, RQ-VAE config
    features_norm.npz  column mean / std of the item vectors (for cold-start items)
    report.json        utilisation per level, collision rate before de-dup, reconstruction
    checkpoints/<step> orbax: RQ-VAE params, optimizer, step, code usage (for --resume)

Training is seeded (each step's batch comes from ``default_rng([seed, step])``), so a resumed
run sees exactly the batches an uninterrupted one would. Metrics go to ``<out>/metrics.jsonl``
(kind ``rqvae``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from genrec_jax.config import Config, RQVAEConfig, to_dict
from genrec_jax.semantic_ids.item_features import item_feature_matrix, standardize
from genrec_jax.semantic_ids.rqvae import (
    RQVAE, collision_rate, deduplicate, encode_codes, kmeans_init, reconstruction_error, restart_dead_codes,
    utilisation,
)
from genrec_jax.train.checkpoint import Checkpointer, atomic_write, atomic_write_json, read_json

SUBDIR = "semantic_ids"


# --------------------------------------------------------------------------- artefacts


@dataclasses.dataclass
class SemanticIDs:
    """A catalogue's semantic IDs and what is needed to give new items theirs."""

    codes: np.ndarray  # int32 [N + 1, L + 1], row 0 padding
    code_sizes: tuple[int, ...]  # codebook size per level, the de-dup level last
    feature_mean: np.ndarray | None = None  # float32 [F]
    feature_std: np.ndarray | None = None
    rqvae: RQVAE | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.codes) - 1

    @property
    def num_levels(self) -> int:
        return len(self.code_sizes)

    def trie(self):
        from genrec_jax.semantic_ids.trie import Trie

        return Trie.from_item_codes(self.codes, self.code_sizes)

    def code_to_item(self) -> np.ndarray:
        """int32 [N, L + 2]: every ID (sorted lexicographically) followed by its item id."""
        body = self.codes[1:].astype(np.int64)
        order = np.lexsort(body.T[::-1])
        return np.concatenate([body[order], (order + 1)[:, None]], axis=1).astype(np.int32)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), mode="wb")


def save_semantic_ids(directory: str | Path, sid: SemanticIDs, report: dict | None = None) -> None:
    """Write the tables (each atomically; meta.json last, so its presence means complete)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(d / "codes.npy", np.asarray(sid.codes, np.int32))
    _atomic_save_npy(d / "code_to_item.npy", sid.code_to_item())
    if sid.feature_mean is not None:
        atomic_write(d / "features_norm.npz",
                     lambda f: np.savez(f, mean=sid.feature_mean, std=sid.feature_std), mode="wb")
    if report is not None:
        atomic_write_json(d / "report.json", report)
    atomic_write_json(d / "meta.json", {**sid.meta, "code_sizes": list(sid.code_sizes), "num_items": sid.num_items})


def semantic_ids_dir(run_dir: str | Path, codes_dir: str | None = None) -> Path:
    return Path(codes_dir) if codes_dir else Path(run_dir) / SUBDIR


def load_item_codes(directory: str | Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """(codes int32 [N + 1, L + 1], code sizes) from a ``semantic_ids`` folder.

    Raises:
        FileNotFoundError: with the command that creates them, when they are missing.
    """
    d = Path(directory)
    if not (d / "codes.npy").is_file() or not (d / "meta.json").is_file():
        run_dir = d.parent if d.name == SUBDIR else d
        raise FileNotFoundError(
            f"no semantic IDs in {d} (codes.npy / meta.json missing): the decoder needs the RQ-VAE's "
            f"item -> code table. Run `python train.py --stage rqvae --out {run_dir}` first (same --config), "
            "or point model.decoder.codes_dir at an existing semantic_ids folder."
        )
    meta = read_json(d / "meta.json")
    codes = np.load(d / "codes.npy", allow_pickle=False).astype(np.int32)
    return codes, tuple(int(k) for k in meta["code_sizes"])


def load_semantic_ids(directory: str | Path, with_model: bool = True) -> SemanticIDs:
    """Everything ``save_semantic_ids`` wrote; ``with_model`` also restores the RQ-VAE."""
    d = Path(directory)
    codes, sizes = load_item_codes(d)
    meta = read_json(d / "meta.json")
    mean = std = None
    if (d / "features_norm.npz").is_file():
        z = np.load(d / "features_norm.npz")
        mean, std = z["mean"], z["std"]
    model = None
    if with_model and "rqvae_config" in meta:
        rcfg = RQVAEConfig(**meta["rqvae_config"])
        model = RQVAE(int(meta["in_dim"]), rcfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        ckpt = Checkpointer(d, keep=1)
        try:
            abstract = jax.tree.map(ocp_abstract, _train_state(params, optax.adam(1e-3), rcfg))
            state, _, _ = ckpt.restore(abstract)
        finally:
            ckpt.close()
        model = nnx.merge(graphdef, state["params"])
    return SemanticIDs(codes, sizes, mean, std, model, meta)


def ocp_abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# --------------------------------------------------------------------------- training


def _train_state(params, tx, rcfg: RQVAEConfig) -> dict:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "usage": [jnp.zeros((k,), jnp.int32) for k in rcfg.codebook_sizes],
    }


def _batch_rows(seed: int, step: int, m: int, batch: int) -> np.ndarray:
    return np.random.default_rng([seed, step]).choice(m, batch, replace=m < batch)


def train_rqvae(
    x: np.ndarray,
    rcfg: RQVAEConfig,
    *,
    progress: bool = False,
    log: Callable[[int, dict], None] | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
) -> tuple[RQVAE, list[dict]]:
    """Train an RQ-VAE on item vectors ``x`` [M, F] (real items only, already standardised).

    Returns the model and the logged rows (step, reconstruction, quantization, per-level
    utilisation of the codes the batches used since the last log).
    """
    x = np.asarray(x, np.float32)
    m = len(x)
    model = RQVAE(x.shape[1], rcfg, rngs=nnx.Rngs(rcfg.seed))
    tx = optax.adam(rcfg.learning_rate)
    start = 0
    if resume and checkpointer is not None and checkpointer.latest_step() is not None:
        graphdef, params = nnx.split(model)
        abstract = jax.tree.map(ocp_abstract, _train_state(params, tx, rcfg))
        state, _, start = checkpointer.restore(abstract)
        model = nnx.merge(graphdef, state["params"])
    else:
        # k-means on the first batch (widened to hold at least as many vectors as codes).
        init_rows = _batch_rows(rcfg.seed, 2**31 - 1, m, min(m, max(rcfg.batch_size, max(rcfg.codebook_sizes))))
        kmeans_init(model, x[init_rows], np.random.default_rng([rcfg.seed, 1]))
        graphdef, params = nnx.split(model)
        state = _train_state(params, tx, rcfg)
    graphdef, _ = nnx.split(model)

    @jax.jit
    def step_fn(state, batch):
        def f(p):
            return nnx.merge(graphdef, p)(batch)

        (_, aux), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        codes = aux.pop("codes")
        usage = [u + jnp.bincount(codes[:, i], length=u.shape[0]).astype(jnp.int32)
                 for i, u in enumerate(state["usage"])]
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "usage": usage}, aux

    history: list[dict] = []
    log_usage = [np.zeros(k, np.int64) for k in rcfg.codebook_sizes]
    bar = tqdm(total=rcfg.num_steps, initial=start, desc="rqvae", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, rcfg.num_steps):
            rows = _batch_rows(rcfg.seed, step, m, rcfg.batch_size)
            prev_usage = [np.asarray(u) for u in state["usage"]] if (step + 1) % rcfg.log_every == 0 else None
            state, aux = step_fn(state, jnp.asarray(x[rows]))
            done = step + 1
            restarted = None
            if rcfg.dead_code_every and done % rcfg.dead_code_every == 0 and done < rcfg.num_steps:
                model = nnx.merge(graphdef, state["params"])
                restarted = restart_dead_codes(model, [np.asarray(u) for u in state["usage"]], x[rows],
                                               np.random.default_rng([rcfg.seed, done, 7]))
                _, params = nnx.split(model)
                state = {**state, "params": params, "usage": [jnp.zeros_like(u) for u in state["usage"]]}
            if prev_usage is not None or done == rcfg.num_steps:
                cur = [np.asarray(u) for u in state["usage"]] if restarted is None else None
                row = {k: float(v) for k, v in jax.device_get(aux).items()}
                if cur is not None and prev_usage is not None:
                    for i in range(len(cur)):
                        log_usage[i] = cur[i] - prev_usage[i]
                    row.update({f"batch_utilisation_l{i}": float(np.mean(log_usage[i] > 0)) for i in range(len(cur))})
                if restarted is not None:
                    row.update({f"restarted_l{i}": float(n) for i, n in enumerate(restarted)})
                history.append({"step": done, **row})
                if log is not None:
                    log(done, row)
                bar.set_postfix(recon=f"{row['reconstruction']:.4f}")
            if checkpointer is not None and rcfg.checkpoint_every and done % rcfg.checkpoint_every == 0 \
                    and done < rcfg.num_steps:
                checkpointer.save(done, state, {"step": done})
            bar.update(1)
    finally:
        bar.close()
    if checkpointer is not None and checkpointer.latest_step() != rcfg.num_steps:
        checkpointer.save(rcfg.num_steps, state, {"step": rcfg.num_steps})
    return nnx.merge(graphdef, state["params"]), history


def _group_ids(codes: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(codes), axis=0, return_inverse=True)[1].reshape(-1)


def assign_semantic_ids(model: RQVAE, x: np.ndarray, dedup_size: int = 0) -> tuple[np.ndarray, tuple[int, ...], dict]:
    """Codes of every real item (``x`` [N, F], item i = row i - 1) with the de-dup level.

    Returns (table int32 [N + 1, L + 1] with padding row 0, code sizes, statistics).
    """
    rq = encode_codes(model, x)
    sizes = tuple(model.code_sizes)
    full = deduplicate(rq)
    max_dup = int(full[:, -1].max()) + 1 if len(full) else 1
    dsize = dedup_size or max(2 * max_dup, 8)
    if dsize < max_dup:
        raise ValueError(f"rqvae.dedup_size={dedup_size} is smaller than the largest collision group ({max_dup})")
    table = np.concatenate([np.zeros((1, full.shape[1]), np.int32), full]).astype(np.int32)
    stats = {
        "utilisation": utilisation(rq, sizes),
        "collision_rate": collision_rate(rq),
        # share of items in a group of two or more (each group's first member included)
        "items_in_collisions": float(np.mean(np.isin(_group_ids(rq), _group_ids(rq)[full[:, -1] > 0]))),
        "largest_collision_group": max_dup,
        "reconstruction_mse": reconstruction_error(model, x),
    }
    return table, (*sizes, dsize), stats


def run_rqvae(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True,
              dataset=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Stage ``rqvae``: build item vectors, train the RQ-VAE, save codes + report; returns the report."""
    from genrec_jax.data.registry import load_dataset
    from genrec_jax.data.sequences import leave_one_out
    from genrec_jax.train.logging import MetricsLogger
    from genrec_jax.train.loop import RunDirError

    out = Path(out)
    sdir = out / SUBDIR
    rcfg = cfg.rqvae
    if (sdir / "meta.json").is_file() and not resume:
        raise RunDirError(f"{sdir} already holds semantic IDs; pass --resume to keep them (or finish that "
                          "run), or choose another --out directory")
    ckpt_dir = sdir / "checkpoints"
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()) and not resume:
        raise RunDirError(f"{ckpt_dir} holds an RQ-VAE checkpoint; pass --resume to continue it, or choose "
                          "another --out directory")
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    raw = item_feature_matrix(rcfg, ds, split.train)
    x, mean, std = standardize(raw)
    body = x[1:]
    sdir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out)
    ckpt = Checkpointer(sdir, keep=1)
    try:
        model, _ = train_rqvae(body, rcfg, progress=progress, checkpointer=ckpt, resume=resume,
                               log=lambda step, row: logger.log(step, "rqvae", row))
        table, sizes, stats = assign_semantic_ids(model, body, rcfg.dedup_size)
        report = {
            "dataset": ds.name, "num_items": ds.num_items, "feature_source": rcfg.features,
            "feature_dim": int(raw.shape[1]), "code_sizes": list(sizes), **stats,
            "steps": rcfg.num_steps, "seconds": round(time.perf_counter() - t0, 2),
        }
        meta = {"rqvae_config": to_dict(rcfg), "in_dim": int(raw.shape[1]), "feature_source": rcfg.features,
                "dataset": ds.name}
        save_semantic_ids(sdir, SemanticIDs(table, sizes, mean, std, model, meta), report)
        logger.log(rcfg.num_steps, "rqvae_final", {
            "reconstruction_mse": stats["reconstruction_mse"], "collision_rate": stats["collision_rate"],
            **{f"utilisation_l{i}": u for i, u in enumerate(stats["utilisation"])},
        })
    finally:
        ckpt.close()
        logger.close()
    util = ", ".join(f"{u:.1%}" for u in report["utilisation"])
    log(f"semantic IDs for {ds.num_items} items -> {sdir}\n"
        f"  code sizes {list(sizes)} (last = de-duplication level)\n"
        f"  codebook utilisation per level: {util}\n"
        f"  collision rate before de-duplication: {report['collision_rate']:.2%} "
        f"(largest group {report['largest_collision_group']})\n"
        f"  reconstruction MSE: {report['reconstruction_mse']:.4f}")
    return report

"""The training program behind ``python train.py``: a small loop with hooks.

    setup (data, split, mesh, model, state; or resume)  ->  for each step:
        batch = loader.next_batch(); state = train_step(state, batch)
        hooks: progress, metrics log (+ NaN check), validation, checkpoint
    ->  final checkpoint, test evaluation beside the baselines, results.json
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from genrec_jax import sharding as shd
from genrec_jax.config import Config, dump_yaml, to_dict
from genrec_jax.data.batching import TrainLoader
from genrec_jax.data.registry import load_dataset
from genrec_jax.data.sequences import CollateOptions, LeaveOneOut, leave_one_out
from genrec_jax.data.types import Dataset
from genrec_jax.eval.evaluate import evaluate_baselines, evaluate_model, format_table
from genrec_jax.model.recommender import build_model
from genrec_jax.train.checkpoint import Checkpointer, atomic_write, atomic_write_json, atomic_write_text, read_json
from genrec_jax.train.logging import MetricsLogger
from genrec_jax.train.step import StepBuilder


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class RunDirError(RuntimeError):
    """The output directory is in a state the requested action cannot use."""


@dataclasses.dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    dataset: Dataset
    split: LeaveOneOut
    steps: StepBuilder
    loader: TrainLoader
    checkpointer: Checkpointer
    logger: MetricsLogger
    state: Any = None
    step: int = 0
    progress: bool = True
    last_metrics: dict = dataclasses.field(default_factory=dict)
    fit_events: Any = None  # the sequences the model trains on (data.fit)


Hook = Callable[[RunContext, int, dict], None]


# --------------------------------------------------------------------------- setup


def write_run_files(run_dir: Path, cfg: Config, ds: Dataset, max_len: int,
                    item_popularity: np.ndarray | None = None) -> None:
    """``item_popularity``: interactions per internal item id in the training sequences
    [N + 1], saved for cold-start placement at serving time (``item_popularity.npy``)."""
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    atomic_write_json(run_dir / "dataset.json", {
        "name": ds.name, "num_items": ds.num_items, "num_actions": ds.num_actions,
        "action_names": list(ds.action_names), "max_len": max_len, "num_users": ds.num_users,
        "has_timestamps": ds.has_timestamps,
    })
    atomic_write_json(run_dir / "items.json", [str(x) for x in ds.item_ids])
    if item_popularity is not None:
        atomic_write(run_dir / "item_popularity.npy",
                     lambda f: np.save(f, np.asarray(item_popularity, np.int64), allow_pickle=False), mode="wb")


def fit_sequences(ds: Dataset, split: LeaveOneOut, fit: str):
    """Training sequences for ``data.fit``: the split's train part, or all but the last event."""
    if fit == "train":
        return split.train
    seqs = ds.sequences
    return seqs.slice_each(np.zeros(len(seqs), np.int64), np.maximum(seqs.lengths - 1, 0))


def collate_options(cfg: Config, ds: Dataset, train: bool) -> CollateOptions:
    """Batch contents the model config asks for (M-FALCON candidates, multi-scale inputs)."""
    m = cfg.model
    ms = m.multiscale
    return CollateOptions(
        num_candidates=m.tasks.num_candidates if (m.tasks.enabled and train) else 0,
        unknown_action=ds.num_actions,
        short_len=ms.short_len if ms.enabled else 0,
        long_window=ms.long_window if ms.enabled else 0,
        max_long_tokens=ms.max_long_tokens if ms.enabled else 0,
        context=ms.enabled and ms.num_context_tokens > 0,
        user_features=ds.user_features if (ms.enabled and ms.user_profile_dim > 0 and ds.user_features is not None) else None,
    )


def item_vectors_for_diversity(ds: Dataset) -> np.ndarray | None:
    return ds.item_features.dense_matrix() if ds.item_features is not None else None


def setup(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          dataset: Dataset | None = None) -> RunContext:
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_ckpt and not resume:
        raise RunDirError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --out directory"
        )
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    max_len = cfg.data.max_seq_len
    mesh = shd.make_mesh(cfg.mesh)
    if cfg.data.batch_size % shd.data_parallel_size(mesh):
        raise shd.ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel mesh size "
            f"{shd.data_parallel_size(mesh)} (data x fsdp x expert)"
        )
    ms = cfg.model.multiscale
    if ms.enabled and ms.user_profile_dim > 0:
        have = None if ds.user_features is None else ds.user_features.shape[1]
        if have != ms.user_profile_dim:
            raise shd.ConfigError(
                f"model.multiscale.user_profile_dim={ms.user_profile_dim} but data set {ds.name!r} has "
                f"{'no user features' if have is None else f'{have} user features'}; set it to "
                f"{have or 0}"
            )
    item_codes = code_sizes = None
    if cfg.model.decoder.enabled:  # semantic-ID decoder: the RQ-VAE stage's item -> code table
        from genrec_jax.semantic_ids.train_rqvae import load_item_codes, semantic_ids_dir

        item_codes, code_sizes = load_item_codes(semantic_ids_dir(run_dir, cfg.model.decoder.codes_dir))
        if len(item_codes) != ds.num_items + 1:
            raise RunDirError(f"the semantic IDs cover {len(item_codes) - 1} items but data set {ds.name!r} has "
                              f"{ds.num_items}: rerun `python train.py --stage rqvae` with this config")
    model = build_model(cfg.model, num_items=ds.num_items, num_actions=ds.num_actions, max_len=max_len,
                        seed=cfg.train.seed, action_names=tuple(ds.action_names),
                        item_codes=item_codes, code_sizes=code_sizes)
    fit_events = fit_sequences(ds, split, cfg.data.fit)
    popularity = ds.item_popularity(fit_events)
    steps = StepBuilder(model, cfg.train, mesh, item_counts=popularity)
    loader = TrainLoader(fit_events, batch_size=cfg.data.batch_size, max_len=max_len,
                         bucket_sizes=cfg.data.bucket_sizes, seed=cfg.train.seed,
                         options=collate_options(cfg, ds, train=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
    ctx = RunContext(cfg, run_dir, ds, split, steps, loader, ckpt, MetricsLogger(run_dir), progress=progress,
                     fit_events=fit_events)
    if resume and has_ckpt:
        state, meta, step = ckpt.restore(steps.abstract_state())
        loader.load_state_dict(meta["loader"])
        ctx.state, ctx.step = state, step
    else:
        write_run_files(run_dir, cfg, ds, max_len, item_popularity=popularity)
        ctx.state, ctx.step = steps.init_state(), 0
    return ctx


# --------------------------------------------------------------------------- hooks


def save_checkpoint(ctx: RunContext, step: int) -> None:
    meta = {"step": step, "loader": ctx.loader.state_dict(), "config": to_dict(ctx.cfg),
            "rng_seed": ctx.cfg.train.seed}
    ctx.checkpointer.save(step, ctx.state, meta)


def log_hook(ctx: RunContext, step: int, metrics: dict) -> None:
    """Fetch the step's metrics every ``log_every`` steps; stop on a non-finite loss."""
    every = ctx.cfg.train.log_every
    if step % every and step != ctx.cfg.train.num_steps:
        return
    vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(vals["loss"]):
        raise TrainingDiverged(
            f"loss became {vals['loss']} at step {step}. Try a lower train.learning_rate "
            f"(now {ctx.cfg.train.learning_rate}), a smaller train.max_grad_norm, or model.dtype=float32; "
            f"the last good checkpoint is in {ctx.checkpointer.directory} (resume with --resume)."
        )
    vals["learning_rate"] = float(ctx.steps.schedule(step))
    ctx.last_metrics = vals
    ctx.logger.log(step, "train", vals)


def eval_hook(ctx: RunContext, step: int, metrics: dict) -> None:
    t = ctx.cfg.train
    if not t.eval_every or step % t.eval_every or step == t.num_steps or ctx.cfg.data.fit != "train":
        return
    res = evaluate_model(
        ctx.steps, ctx.state["params"], ctx.split.valid, num_items=ctx.dataset.num_items,
        max_len=ctx.cfg.data.max_seq_len, ks=ctx.cfg.eval.ks, batch_size=ctx.cfg.eval.batch_size,
        exclude_history=ctx.cfg.eval.exclude_history, max_users=ctx.cfg.eval.max_users, progress=False,
        options=collate_options(ctx.cfg, ctx.dataset, train=False),
    )
    ctx.logger.log(step, "valid", res)
    ctx.last_metrics.update({f"val_{k}": v for k, v in res.items() if k in ("HR@10", "NDCG@10")})


def checkpoint_hook(ctx: RunContext, step: int, metrics: dict) -> None:
    every = ctx.cfg.train.checkpoint_every
    if every and step % every == 0 and step != ctx.cfg.train.num_steps:
        save_checkpoint(ctx, step)


DEFAULT_HOOKS: tuple[Hook, ...] = (log_hook, eval_hook, checkpoint_hook)


# --------------------------------------------------------------------------- loop


def train_loop(ctx: RunContext, hooks: tuple[Hook, ...] = DEFAULT_HOOKS, stop_after: int | None = None) -> None:
    """Run steps ``ctx.step + 1 .. num_steps`` (``stop_after``: stop early, as a crash would)."""
    total = ctx.cfg.train.num_steps
    bar = tqdm(total=total, initial=ctx.step, desc="train", disable=not ctx.progress, dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    try:
        while ctx.step < total:
            batch = ctx.loader.next_batch()
            tokens += int(batch["lengths"].sum())
            ctx.state, metrics = ctx.steps.train_step(ctx.state, ctx.steps.device_batch(batch))
            ctx.step += 1
            for hook in hooks:
                hook(ctx, ctx.step, metrics)
            bar.update(1)
            if ctx.last_metrics and ctx.step % ctx.cfg.train.log_every == 0:
                post = {"loss": f"{ctx.last_metrics['loss']:.3f}"}
                if "val_HR@10" in ctx.last_metrics:
                    post["val_HR@10"] = f"{ctx.last_metrics['val_HR@10']:.3f}"
                bar.set_postfix(post)
            if stop_after is not None and ctx.step >= stop_after:
                return
    finally:
        bar.close()
        elapsed = time.perf_counter() - t0
        if elapsed > 0 and tokens:
            ctx.logger.log(ctx.step, "throughput", {"tokens_per_s": tokens / elapsed, "seconds": elapsed})


def final_evaluation(ctx: RunContext) -> dict[str, dict[str, float]]:
    """Test-set metrics of the model beside popularity and item-transition baselines."""
    cfg, ds = ctx.cfg, ctx.dataset
    pop = ds.item_popularity(ctx.fit_events)
    vectors = item_vectors_for_diversity(ds)
    rows = {}
    name = cfg.model.arch.upper() if cfg.model.arch == "hstu" else "SASRec"
    rows[name] = evaluate_model(
        ctx.steps, ctx.state["params"], ctx.split.test, num_items=ds.num_items, max_len=cfg.data.max_seq_len,
        ks=cfg.eval.ks, batch_size=cfg.eval.batch_size, exclude_history=cfg.eval.exclude_history,
        item_popularity=pop, item_vectors=vectors, progress=ctx.progress, desc="test",
        options=collate_options(cfg, ds, train=False),
    )
    if cfg.model.decoder.enabled:  # beam-searched semantic IDs, same users and protocol
        from genrec_jax.semantic_ids.generative_eval import evaluate_generative
        from genrec_jax.semantic_ids.trie import Trie

        model = ctx.steps.model(ctx.state["params"])
        rows["generative"] = evaluate_generative(
            model, ctx.split.test, trie=Trie.from_item_codes(np.asarray(model.item_codes[...]),
                                                             model.decoder.code_sizes),
            max_len=cfg.data.max_seq_len, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size,
            beam_width=cfg.model.decoder.beam_width, exclude_history=cfg.eval.exclude_history,
            item_popularity=pop, item_vectors=vectors, options=collate_options(cfg, ds, train=False),
            progress=ctx.progress, desc="test (beam search)",
        )
    if cfg.eval.baselines:
        rows.update(evaluate_baselines(
            ctx.fit_events, ctx.split.test, num_items=ds.num_items, ks=cfg.eval.ks,
            exclude_history=cfg.eval.exclude_history, item_popularity=pop, item_vectors=vectors,
        ))
    return rows


def run(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, dataset: Dataset | None = None, evaluate: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) and evaluate; returns {"step", "results" (per model), "run_dir"}."""
    ctx = setup(cfg, run_dir, resume=resume, progress=progress, dataset=dataset)
    try:
        if ctx.step >= cfg.train.num_steps and resume:
            log(f"run in {run_dir} already finished at step {ctx.step}; evaluating")
        train_loop(ctx, stop_after=stop_after)
        if stop_after is not None and ctx.step < cfg.train.num_steps:
            return {"step": ctx.step, "results": {}, "run_dir": str(run_dir), "state": ctx.state}
        if ctx.checkpointer.latest_step() != ctx.step:
            save_checkpoint(ctx, ctx.step)
        results = final_evaluation(ctx) if evaluate else {}
        if results:
            shown = (5, 10) if cfg.model.decoder.enabled else (10,)  # generative rows: TIGER's columns
            ks = [f"HR@{k}" for k in shown if k in cfg.eval.ks] + [f"NDCG@{k}" for k in shown if k in cfg.eval.ks]
            cols = ks + ["MRR", "Coverage", "Gini"]
            hist = "history items removed" if cfg.eval.exclude_history else "history items kept"
            log(f"\nTest set, leave-one-out, full ranking over {ctx.dataset.num_items} items, {hist} "
                f"({len(ctx.split.test)} users):\n" + format_table(results, cols))
            ctx.logger.log(ctx.step, "test", {f"{m}/{k}": v for m, r in results.items() for k, v in r.items()})
            atomic_write_json(Path(run_dir) / "results.json", {"step": ctx.step, "test": results})
        return {"step": ctx.step, "results": results, "run_dir": str(run_dir), "state": ctx.state}
    finally:
        ctx.logger.close()
        ctx.checkpointer.close()


def load_run_info(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "dataset.json")

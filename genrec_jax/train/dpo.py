"""DPO preference alignment (Rafailov et al. 2023) for the retrieval policy.

The policy is the model's next-item distribution pi(i | history) = softmax(s(u_t, .))[i].
Preference pairs come from the logged actions: at position t, the chosen item is the next
event when the user engaged with it (like / share / purchase), the rejected item is the
next item after it that the same user skipped. With a frozen reference model pi_ref:

    L = -log sigmoid( beta * [ (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)) ] )

``python train.py --stage dpo --out RUN`` starts from RUN's trained checkpoint (also the
frozen reference, unless ``train.dpo.reference`` names another run) and writes the aligned
model to ``RUN/dpo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.config import Config
from genrec_jax.data.batching import TrainLoader
from genrec_jax.data.registry import load_dataset
from genrec_jax.data.sequences import collate_train, leave_one_out
from genrec_jax.data.types import ENGAGED_ACTIONS, EventSequences
from genrec_jax.sharding import make_mesh
from genrec_jax.train.checkpoint import Checkpointer
from genrec_jax.train.restore import load_trained
from genrec_jax.train.step import StepBuilder


def next_skipped_items(seqs: EventSequences, skip_action: int) -> EventSequences:
    """A copy of ``seqs`` whose item at event e is the first item skipped strictly after e
    by the same user (0 when none): the rejected partner of a chosen event e."""
    out = np.zeros_like(seqs.items)
    for u in range(len(seqs)):
        s, e = int(seqs.offsets[u]), int(seqs.offsets[u + 1])
        nxt = 0
        for j in range(e - 1, s - 1, -1):
            out[j] = nxt
            if seqs.actions[j] == skip_action:
                nxt = seqs.items[j]
    return EventSequences(seqs.offsets, out, seqs.actions, seqs.timestamps, seqs.watch_ratio, seqs.user_index)


class PreferenceLoader:
    """Training batches plus, per position, the rejected item for the chosen next item."""

    def __init__(self, seqs: EventSequences, action_names, *, batch_size, max_len, bucket_sizes, seed):
        if "skip" not in action_names:
            raise ValueError("DPO needs a 'skip' action in the data set to form rejected items")
        self.engaged = np.array([action_names.index(a) for a in ENGAGED_ACTIONS if a in action_names])
        self.loader = TrainLoader(seqs, batch_size=batch_size, max_len=max_len, bucket_sizes=bucket_sizes, seed=seed)
        self.shadow = next_skipped_items(seqs, action_names.index("skip"))

    def next_batch(self) -> dict[str, np.ndarray]:
        plan = self.loader._get_plan(self.loader.state.epoch)
        if self.loader.state.index >= len(plan):
            self.loader.load_state_dict({"epoch": self.loader.state.epoch + 1, "index": 0})
            plan = self.loader._get_plan(self.loader.state.epoch)
        pad_len, rows = plan[self.loader.state.index]
        batch = self.loader.next_batch()
        shadow = collate_train(self.shadow, rows, pad_len, self.loader.max_len)
        chosen_ok = np.isin(batch["target_actions"], self.engaged) & (batch["targets"] > 0)
        rejected = np.where(chosen_ok, shadow["targets"], 0)
        batch["chosen"] = np.where(rejected > 0, batch["targets"], 0).astype(np.int32)
        batch["rejected"] = rejected.astype(np.int32)
        return batch


def dpo_loss(policy, reference, batch: dict, key, beta: float):
    """Mean DPO loss over the positions that carry a (chosen, rejected) pair."""

    def logp(model, dropout_key):
        states, _ = model.encode(batch, dropout_key=dropout_key)
        logits = model.score_items(model.user_vectors(states)).at[..., 0].set(-1e30)
        lsm = jax.nn.log_softmax(logits, axis=-1)
        pick = lambda ids: jnp.take_along_axis(lsm, ids[..., None], axis=-1)[..., 0]  # noqa: E731
        return pick(batch["chosen"]), pick(batch["rejected"])

    # No dropout on either side: with policy == reference at the start, the margin is exactly
    # 0 (loss log 2), and it moves only through the parameters.
    pc, pr = logp(policy, None)
    rc, rr = logp(reference, None)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    margin = beta * ((pc - rc) - (pr - rr))
    mask = (batch["chosen"] > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(-jax.nn.log_sigmoid(margin) * mask) / n
    acc = jnp.sum((margin > 0) * mask) / n
    return loss, {"loss": loss, "dpo_loss": loss, "dpo_reward_accuracy": acc, "dpo_margin": jnp.sum(margin * mask) / n,
                  "dpo_pairs": jnp.sum(mask)}


class DPOTrainer:
    """Policy = a trainable copy of the reference; the reference's params are a jit argument."""

    def __init__(self, policy: nnx.Module, reference: nnx.Module, cfg: Config, mesh):
        d = cfg.train.dpo
        self.beta = d.beta
        self.steps = StepBuilder(policy, cfg.train, mesh, num_steps=d.num_steps, learning_rate=d.learning_rate,
                                 loss_fn=self._loss)
        self.ref_graph, self.ref_params, self.ref_rest = nnx.split(reference, nnx.Param, ...)
        self._ref_params_dev = None

    def _loss(self, model, batch, key, obj, log_q):
        batch = dict(batch)
        reference = nnx.merge(self.ref_graph, batch.pop("__ref_params__"), self.ref_rest)
        return dpo_loss(model, reference, batch, key, self.beta)

    def step(self, state, batch: dict):
        dev = self.steps.device_batch(batch)
        dev["__ref_params__"] = self.ref_params
        return self.steps.train_step(state, dev)


def run_dpo(cfg: Config, out: str | Path, progress: bool = True, log=print) -> dict[str, Any]:
    """Align the model trained in ``out`` (or ``train.dpo.reference``) and save to ``out/dpo``."""
    from tqdm.auto import tqdm

    from genrec_jax.train.logging import MetricsLogger

    out = Path(out)
    ref_dir = Path(cfg.train.dpo.reference) if cfg.train.dpo.reference else out
    reference = load_trained(ref_dir)
    policy = load_trained(ref_dir).model
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    loader = PreferenceLoader(split.train, tuple(ds.action_names), batch_size=cfg.data.batch_size,
                              max_len=cfg.data.max_seq_len, bucket_sizes=cfg.data.bucket_sizes, seed=cfg.train.seed)
    trainer = DPOTrainer(policy, reference.model, cfg, make_mesh(cfg.mesh))
    state = trainer.steps.init_state()
    logger = MetricsLogger(out / "dpo")
    history = []
    for step in tqdm(range(1, cfg.train.dpo.num_steps + 1), desc="dpo", disable=not progress):
        state, m = trainer.step(state, loader.next_batch())
        if step % cfg.train.log_every == 0 or step == cfg.train.dpo.num_steps:
            vals = {k: float(v) for k, v in jax.device_get(m).items()}
            if not np.isfinite(vals["loss"]):
                raise RuntimeError(f"DPO loss became {vals['loss']} at step {step}; lower train.dpo.learning_rate")
            logger.log(step, "dpo", vals)
            history.append(vals)
    from genrec_jax.train.loop import write_run_files

    write_run_files(out / "dpo", reference.cfg, ds, reference.info["max_len"],  # servable run directory
                    item_popularity=reference.item_popularity)
    ckpt = Checkpointer(out / "dpo", keep=1)
    ckpt.save(cfg.train.dpo.num_steps, state, {"stage": "dpo", "reference": str(ref_dir)})
    ckpt.close()
    logger.close()
    if history:
        log(f"DPO: loss {history[0]['dpo_loss']:.4f} -> {history[-1]['dpo_loss']:.4f}, "
            f"reward accuracy {history[-1]['dpo_reward_accuracy']:.3f} (checkpoint in {out / 'dpo'})")
    return {"history": history, "state": state}

"""The jit-compiled train step and evaluation step over a device mesh.

The model is split once into (graphdef, params, rest); the train state is the pytree
``{"params", "opt_state", "step", "rng"}``. Both steps are jitted with explicit input and
output shardings derived from the parameters' logical axes, so the same code runs on one
CPU, 8 simulated devices, or a multi-GPU host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genrec_jax import sharding as shd
from genrec_jax.config import TrainConfig
from genrec_jax.eval.metrics import ranks_from_scores_jax
from genrec_jax.train import losses

HOST_ONLY_KEYS = ("history_items",)


# Learnt scalars left out of the global-norm gradient clip. The decoder's repeat offsets are
# stored scaled down (decoder.REPEAT_BIAS_SCALE), so their gradients are large while they
# grow; inside the clip they would set the step of every other weight for the first
# thousand-odd steps. Adam normalises each parameter's step on its own, so they need no clip.
UNCLIPPED = ("repeat_bias",)


def clip_mask(params):
    """True for the parameters the global-norm clip covers (all but ``UNCLIPPED`` names)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(name in jax.tree_util.keystr(path) for name in UNCLIPPED), params)


def make_optimizer(tcfg: TrainConfig, num_steps: int | None = None, learning_rate: float | None = None):
    """AdamW with linear warm-up and cosine decay; weight decay on matrices only; gradients
    clipped to ``max_grad_norm`` by global norm (all but ``UNCLIPPED``)."""
    lr = tcfg.learning_rate if learning_rate is None else learning_rate
    steps = tcfg.num_steps if num_steps is None else num_steps
    warmup = min(tcfg.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=lr * 0.05,
    )
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.masked(optax.clip_by_global_norm(tcfg.max_grad_norm), clip_mask),
        optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay_mask),
    ), schedule


def _global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


@dataclasses.dataclass
class Objective:
    """Which loss terms to compute, and their weights (from TrainConfig)."""

    loss: str = "softmax"
    num_negatives: int = 512
    retrieval_weight: float = 1.0
    contrastive_weight: float = 0.0
    multitask_weight: float = 1.0
    decoder_weight: float = 1.0
    logits_dtype: str = "float32"

    @classmethod
    def from_config(cls, t: TrainConfig) -> "Objective":
        return cls(t.loss, t.num_negatives, t.retrieval_weight, t.contrastive_weight, t.multitask_weight,
                   t.decoder_weight, t.logits_dtype)


def compute_loss(model, batch: dict, key: jax.Array, obj: Objective, log_q: jax.Array | None):
    """Total loss and its parts for one batch (the model is already merged)."""
    k_drop, k_neg = jax.random.split(key)
    states, aux = model.encode(batch, dropout_key=k_drop)
    n = batch["items"].shape[1]
    lengths = batch["lengths"]
    mask = (jnp.arange(n)[None, :] < lengths[:, None]) & (batch["targets"] > 0)
    u = model.user_vectors(states)
    scale = model.logit_scale()
    metrics: dict[str, jax.Array] = {}
    total = 0.0
    if obj.retrieval_weight > 0:  # 0 = decoder-only training (semantic-ID decoder)
        if obj.loss == "softmax":
            rl, m = losses.full_softmax_loss(u, model.item_table(), batch["targets"], mask, scale)
        else:  # only the targets' and the negatives' rows are read (and normalised)
            rl, m = losses.sampled_softmax_loss(u, model.item_vectors, batch["targets"], mask, scale, log_q,
                                                obj.num_negatives, k_neg, logits_dtype=obj.logits_dtype)
        metrics.update(m)
        total = total + obj.retrieval_weight * rl
    # --- semantic-ID decoder: next-item code prediction from memory s_0..s_i at sampled positions i
    if getattr(model, "decoder", None) is not None and obj.decoder_weight > 0:
        from genrec_jax.semantic_ids.decoder import decoder_loss

        dec_len = lengths - batch["num_targets"] if "num_targets" in batch else lengths
        k_pos, k_dec = jax.random.split(jax.random.fold_in(key, 0x5EC1D))
        dcfg = model.cfg.decoder
        dl, m = decoder_loss(model.decoder, model.item_codes[...], states, dec_len, batch["targets"], k_pos,
                             dcfg.positions_per_seq, dropout_key=k_dec, items=batch["items"],
                             unlikelihood=dcfg.history_unlikelihood, unlikelihood_levels=dcfg.unlikelihood_levels,
                             unlikelihood_positions=dcfg.unlikelihood_positions)
        for name, val in m.items():
            metrics[name] = val
            if name.endswith("_loss") and name != "decoder_loss":  # MoE aux terms, already weighted
                total = total + val
        total = total + obj.decoder_weight * dl
    # --- end semantic-ID decoder
    if obj.contrastive_weight > 0:
        # The last history token of each row (M-FALCON candidates, if any, come after it).
        hist_len = lengths - batch["num_targets"] if "num_targets" in batch else lengths
        last = model.last_states(u, hist_len)
        tgt = jnp.take_along_axis(batch["targets"], jnp.maximum(hist_len - 1, 0)[:, None], axis=1)[:, 0]
        cl, m = losses.infonce_loss(last, model.item_vectors(tgt), (hist_len > 0) & (tgt > 0), scale, tgt)
        metrics.update(m)
        total = total + obj.contrastive_weight * cl
    if getattr(model, "tasks", None) is not None and "num_targets" in batch and obj.multitask_weight > 0:
        tl, m = multitask_loss(model, states, batch)
        metrics.update(m)
        total = total + obj.multitask_weight * tl
    for name, val in aux.items():  # e.g. MoE balance / z losses, already weighted
        metrics[name] = val
        if name.endswith("_loss"):
            total = total + val
    metrics["loss"] = total
    return total, metrics


def candidate_features(model, states: jax.Array, batch: dict):
    """Inputs of the ranking heads for every token position: the token's own state, its
    item embedding, and the row's last history state (+ the user-profile vector)."""
    lengths, nt = batch["lengths"], batch["num_targets"]
    hist_last = jnp.maximum(lengths - nt - 1, 0)
    user = jnp.take_along_axis(states, hist_last[:, None, None], axis=1)[:, 0]
    item = model.item_emb(batch["items"])
    profile = None
    if getattr(model, "profile_proj", None) is not None and "user_features" in batch:
        profile = model.profile_proj(batch["user_features"].astype(jnp.float32))
    return states, item, user, profile


def multitask_loss(model, states: jax.Array, batch: dict):
    """Ranking heads on the M-FALCON candidate tokens, labelled by their real actions."""
    from genrec_jax.model.heads import task_labels

    n = states.shape[1]
    j = jnp.arange(n)[None, :]
    lengths, nt = batch["lengths"], batch["num_targets"]
    mask = (j >= (lengths - nt)[:, None]) & (j < lengths[:, None])
    cand, item, user, profile = candidate_features(model, states, batch)
    logits = model.tasks(cand, item, user, profile)
    labels = task_labels(batch["cand_actions"], batch["cand_watch"], model.action_names, model.tasks.tasks)
    return model.tasks.losses(logits, labels, mask)


class StepBuilder:
    """Builds the sharded train state and the jitted train / eval steps for one model."""

    def __init__(self, model: nnx.Module, tcfg: TrainConfig, mesh: Mesh, *, num_steps: int | None = None,
                 item_counts: np.ndarray | None = None, loss_fn: Callable | None = None,
                 learning_rate: float | None = None):
        self.mesh = mesh
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.param_specs = shd.state_specs(params, mesh)
        self.tx, self.schedule = make_optimizer(tcfg, num_steps, learning_rate)
        self.objective = Objective.from_config(tcfg)
        self.loss_fn = loss_fn or compute_loss
        self.log_q = (
            jnp.asarray(losses.sampling_log_q(jnp.asarray(item_counts))) if item_counts is not None else None
        )
        self.seed = tcfg.seed
        # Params leave nnx.Variable wrappers behind: a pure State of arrays.
        self._params_template = params
        self._train_step = None
        self._eval_step = {}

    # ----------------------------------------------------------------- state

    def state_shardings(self, state: Any) -> Any:
        """Shardings of a train state: params by their logical axes; optimizer moments like
        the params they track (matched by key path suffix and shape); the rest replicated."""
        repl = NamedSharding(self.mesh, P())
        param_sh = shd.named(self.mesh, self.param_specs)
        by_path = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(self._params_template)[0]:
            by_path[jax.tree_util.keystr(path)] = leaf.shape
        spec_leaves = jax.tree_util.tree_flatten_with_path(
            param_sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
        sh_by_path = {jax.tree_util.keystr(p): s for p, s in spec_leaves}

        def opt_leaf(path, leaf):
            for i in range(len(path)):
                key = jax.tree_util.keystr(path[i:])
                if key in sh_by_path and by_path.get(key) == getattr(leaf, "shape", None):
                    return sh_by_path[key]
            return repl

        opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"])
        return {"params": param_sh, "opt_state": opt_sh, "step": repl, "rng": repl}

    def init_state(self) -> Any:
        params = self._params_template
        state = {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.seed)),
        }
        sh = self.state_shardings(state)
        return jax.device_put(state, sh)

    def abstract_state(self) -> Any:
        """ShapeDtypeStructs (with target shardings) of the train state, for restoring."""
        state = jax.eval_shape(lambda: {
            "params": self._params_template,
            "opt_state": self.tx.init(self._params_template),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.seed)),
        })
        sh = self.state_shardings(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)

    def model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    # ----------------------------------------------------------------- batches

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for k, v in batch.items():
            if k in HOST_ONLY_KEYS:
                continue
            v = np.asarray(v)
            sh = NamedSharding(self.mesh, shd.batch_spec(self.mesh, v.ndim, v.shape[0]))
            out[k] = jax.device_put(v, sh)
        return out

    # ----------------------------------------------------------------- train step

    def train_step(self, state: Any, batch: dict[str, jax.Array]):
        if self._train_step is None:
            graphdef, rest, obj, log_q, loss_fn, tx = self.graphdef, self.rest, self.objective, self.log_q, self.loss_fn, self.tx

            def step(state, batch):
                key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

                def f(params):
                    model = nnx.merge(graphdef, params, rest)
                    return loss_fn(model, batch, key, obj, log_q)

                (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
                updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
                params = optax.apply_updates(state["params"], updates)
                metrics["grad_norm"] = _global_norm(grads)
                new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
                return new, metrics

            sh = self.state_shardings(jax.eval_shape(lambda: state))
            repl = NamedSharding(self.mesh, P())
            self._train_step = jax.jit(step, in_shardings=(sh, None), out_shardings=(sh, repl), donate_argnums=0)
        # Traced under the mesh so that the Triton kernels run per shard (sharding.per_shard).
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    # ----------------------------------------------------------------- eval step

    def eval_step(self, params: Any, batch: dict[str, jax.Array], k: int, exclude_history: bool,
                  hist: jax.Array | None = None):
        """(ranks [B], top-k item ids [B, k]) for the batch's targets over the full catalogue."""
        key = (k, exclude_history)
        if key not in self._eval_step:
            graphdef, rest = self.graphdef, self.rest

            def fn(params, batch, hist):
                model = nnx.merge(graphdef, params, rest)
                u = model.user_vectors(model.encode_last(batch))
                scores = model.score_items(u)
                b, v = scores.shape
                exclude = jnp.zeros((b, v), bool)
                if exclude_history:
                    exclude = exclude.at[jnp.arange(b)[:, None], hist].set(True).at[:, 0].set(False)
                ranks = ranks_from_scores_jax(scores, batch["target_items"], exclude)
                masked = jnp.where(exclude, -jnp.inf, scores).at[:, 0].set(-jnp.inf)
                _, topk = jax.lax.top_k(masked, k)
                return ranks, topk

            self._eval_step[key] = jax.jit(fn)
        if hist is None:
            hist = jnp.zeros((batch["items"].shape[0], 1), jnp.int32)
        with jax.set_mesh(self.mesh):
            return self._eval_step[key](params, batch, hist)

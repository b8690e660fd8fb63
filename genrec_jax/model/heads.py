"""Multi-task ranking heads (engagement, retention, monetization, watch ratio).

For each candidate item (an M-FALCON target token that saw the user's history and itself):

    f     = [h_cand, e_item, h_user (, e_profile)]          F feature vectors of width D
    z     = pairwise_interaction(f)                          the F(F-1)/2 dot products (DLRM)
    logit = MLP([h_cand, z])                                 one logit per task

Labels: engagement = like/share/purchase, retention = not skip, monetization = purchase
(binary cross-entropy), watch = watch ratio in [0, 1] (squared error on the sigmoid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.config import TaskHeadsConfig
from genrec_jax.model.layers import Dense

REGRESSION_TASKS = ("watch",)


def task_labels(actions: jax.Array, watch: jax.Array, action_names: tuple[str, ...], tasks: list[str]) -> jax.Array:
    """Float labels [..., T] for the configured tasks from action ids and watch ratios."""
    idx = {name: i for i, name in enumerate(action_names)}

    def is_any(names):
        out = jnp.zeros(actions.shape, bool)
        for n in names:
            if n in idx:
                out = out | (actions == idx[n])
        return out

    cols = []
    for t in tasks:
        if t == "engagement":
            cols.append(is_any(("like", "share", "purchase")))
        elif t == "retention":
            cols.append(~is_any(("skip",)))
        elif t == "monetization":
            cols.append(is_any(("purchase",)))
        elif t == "watch":
            cols.append(watch)
        else:
            raise ValueError(f"unknown task {t!r}")
    return jnp.stack([c.astype(jnp.float32) for c in cols], axis=-1)


class TaskHeads(nnx.Module):
    def __init__(self, embed_dim: int, cfg: TaskHeadsConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 with_profile: bool = False):
        self.tasks = list(cfg.tasks)
        self.interaction = cfg.interaction
        self.num_features = 4 if with_profile else 3
        f = self.num_features
        in_dim = embed_dim + (f * (f - 1) // 2 if cfg.interaction else (f - 1) * embed_dim)
        self.fc1 = Dense(in_dim, cfg.hidden_dim, axes=(None, "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(cfg.hidden_dim, cfg.hidden_dim, axes=("mlp", None), rngs=rngs, dtype=dtype)
        self.out = Dense(cfg.hidden_dim, len(self.tasks), axes=(None, None), rngs=rngs, dtype=dtype)

    def __call__(self, cand: jax.Array, item: jax.Array, user: jax.Array, profile: jax.Array | None = None,
                 backend: str = "auto") -> jax.Array:
        """cand, item: [B, M, D]; user (and profile): [B, D] -> logits [B, M, T]."""
        b, m, d = cand.shape
        feats = [cand, item, jnp.broadcast_to(user[:, None, :], (b, m, d))]
        if self.num_features == 4:
            prof = jnp.zeros((b, d), cand.dtype) if profile is None else profile
            feats.append(jnp.broadcast_to(prof[:, None, :], (b, m, d)))
        stacked = jnp.stack([f.astype(jnp.float32) for f in feats], axis=2)  # [B, M, F, D]
        if self.interaction:
            from genrec_jax.ops.interaction import pairwise_interaction

            z = pairwise_interaction(stacked.reshape(b * m, self.num_features, d), backend=backend)
            z = z.reshape(b, m, -1) / jnp.sqrt(d)
            h = jnp.concatenate([cand.astype(jnp.float32), z], axis=-1)
        else:
            h = stacked.reshape(b, m, -1)
        h = jax.nn.gelu(self.fc1(h))
        h = jax.nn.gelu(self.fc2(h))
        return self.out(h).astype(jnp.float32)

    def losses(self, logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
        """Mean over tasks of the per-task loss on masked candidates."""
        m = mask.astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(m), 1.0)
        total, metrics = 0.0, {}
        for i, t in enumerate(self.tasks):
            z, y = logits[..., i], labels[..., i]
            if t in REGRESSION_TASKS:
                per = jnp.square(jax.nn.sigmoid(z) - y)
            else:
                per = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))  # stable BCE
            lt = jnp.sum(per * m) / denom
            metrics[f"task_{t}_loss_value"] = lt
            total = total + lt
        total = total / len(self.tasks)
        metrics["multitask_loss"] = total
        return total, metrics

"""Scale planning without hardware: ``python train.py --config configs/xl.yaml --dry-run --mesh ...``.

The model is built abstractly (``nnx.eval_shape``: shapes only, nothing allocated); each
parameter's bytes per device follow from its logical axes and the mesh (the same rules the
trainer shards with). Counted per device:

* params (fp32), gradients (fp32) and AdamW moments (2 x fp32), each divided by the number
  of devices its PartitionSpec splits it over;
* activations kept for the backward pass, per layer per token (floats)::

      a_layer = D (input) + H(2dv + 2dqk) (U,V,Q,K) + 2 H dv (A V, its norm) + D (output)
              [+ top_k F + D for an MoE FFN, 2F + D for a dense FFN]

  plus the attention scores H·N per token (the XLA reference materialises them; the Triton
  kernel does not: ``--attention triton`` drops that term); tokens per device =
  batch x N / (data x fsdp x expert), heads split over ``tensor``. With the ``blocked`` MoE
  routing, each layer also keeps its per-block copies of the expert weights: 2 x blocks x
  D x F values, blocks = ceil((T k + E (M - 1)) / M) for T tokens per device and M rows per
  block (``genrec_jax.model.moe.block_rows``); with ``model.moe.remat_blocks`` only one layer's copies
  are live at a time. With ``model.moe.dispatch=all_to_all`` over an expert axis of size X,
  the blocks hold the rows a device receives (X x slots, ``all_to_all_slots``) for its E / X
  experts, and each layer keeps its send, receive and return buffers (3 x rows x D).
  With the Triton kernels, a layer's backward with ``model.attention_dq_mode`` "stored" (or
  "auto" from N = 1024 while it fits in 4 GiB) also holds, for that layer only, the stored
  dS: sequences x local heads x 128^2 x T (T + 1) / 2 values, T = ceil(N / 128)
  (``stored_ds_floats``; the kernels' slab is 128 or 64 keys, 128 the larger count).

FLOPs per token (forward; training = 3x forward), with n̄ = (N + 1) / 2 keys per query:

    HSTU layer   2 D H (2dv + 2dqk) + 2 H (dqk + dv) n̄ + 2 H dv D
    MoE FFN      top_k · 4 D F + 2 D E        (dense FFN: 4 D F)
    retrieval    2 D (V or K + 1)             (full or sampled softmax)
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import numpy as np
from flax import nnx

from genrec_jax.config import Config, ConfigError
from genrec_jax.model.recommender import build_model
from genrec_jax.ops.hstu_attention import auto_stores_ds, stored_ds_elements
from genrec_jax.sharding import MESH_AXES, LOGICAL_RULES, logical_to_spec, mesh_shape

GIB = 1024**3


@dataclasses.dataclass
class Plan:
    num_params: int
    num_params_item_table: int
    mesh: dict[str, int]
    bytes_params: float  # per device
    bytes_grads: float
    bytes_optimizer: float
    bytes_activations: float
    flops_per_token_forward: float
    tokens_per_device: int

    @property
    def bytes_total(self) -> float:
        return self.bytes_params + self.bytes_grads + self.bytes_optimizer + self.bytes_activations

    @property
    def flops_per_token_train(self) -> float:
        return 3.0 * self.flops_per_token_forward


def abstract_params(cfg: Config, num_items: int, num_actions: int = 5):
    """nnx.State of ShapeDtypeStructs (with their ``axes`` metadata), nothing allocated."""
    abs_model = nnx.eval_shape(lambda: build_model(cfg.model, num_items=num_items, num_actions=num_actions,
                                                   max_len=cfg.data.max_seq_len, seed=0))
    return nnx.state(abs_model, nnx.Param)


def _leaves_with_axes(state):
    out = []
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        value = (var.get_value() if hasattr(var, "get_value") else var.value) if isinstance(var, nnx.Variable) else var
        axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
        out.append((jax.tree_util.keystr(path), tuple(value.shape), axes))
    return out


def shard_factor(shape, axes, mesh: dict[str, int]) -> int:
    if axes is None:
        return 1
    spec = logical_to_spec(axes, shape, mesh, LOGICAL_RULES)
    f = 1
    for entry in spec:
        for a in (entry if isinstance(entry, tuple) else (entry,)):
            if a is not None:
                f *= mesh[a]
    return f


def attention_flops_per_token(cfg: Config) -> float:
    """Forward FLOPs per token of the score and value products alone, all layers (the
    attention term of :func:`flops_per_token`)."""
    m, n = cfg.model, cfg.data.max_seq_len
    keys = (n + 1) / 2
    if m.arch == "hstu":
        return m.num_layers * 2 * m.num_heads * (m.attn_dim + m.linear_dim) * keys
    return m.num_layers * 4 * m.embed_dim * keys


def flops_per_token(cfg: Config, num_items: int) -> float:
    m = cfg.model
    d, h, dqk, dv = m.embed_dim, m.num_heads, m.attn_dim, m.linear_dim
    if m.arch == "hstu":
        layer = 2 * d * h * (2 * dv + 2 * dqk) + 2 * h * dv * d
    else:  # SASRec: q,k,v,o projections + softmax attention + FFN
        layer = 8 * d * d + 4 * d * m.ffn_dim
    if m.ffn == "moe":
        layer += m.moe.top_k * 4 * d * m.moe.expert_dim + 2 * d * m.moe.num_experts
    elif m.ffn == "dense":
        layer += 4 * d * m.ffn_dim
    vocab = num_items + 1 if cfg.train.loss == "softmax" else cfg.train.num_negatives + 1
    return m.num_layers * layer + attention_flops_per_token(cfg) + 2 * d * vocab


def activation_floats_per_token(cfg: Config, attention: str, tensor: int) -> float:
    m, n = cfg.model, cfg.data.max_seq_len
    d, h, dqk, dv = m.embed_dim, m.num_heads, m.attn_dim, m.linear_dim
    h_local = max(h // tensor, 1) if h % tensor == 0 else h
    layer = d + h_local * (2 * dv + 2 * dqk) + 2 * h_local * dv + d
    if m.ffn == "moe":
        layer += m.moe.top_k * m.moe.expert_dim + d
    elif m.ffn == "dense":
        layer += 2 * m.ffn_dim + d
    if attention == "xla":
        layer += h_local * n  # the [H, N, N] score matrix, per query token
    return m.num_layers * layer


STORED_DS_SLAB = 128  # the stored-dS layout's key block (kernels/hstu_attention.py), the larger one


def stored_ds_floats(cfg: Config, tokens: int, tensor: int) -> float:
    """Values of the dS buffer one layer's Triton backward holds with the stored-dS dQ
    (``model.attention_dq_mode``), on a device with ``tokens`` tokens; 0 when it does not
    store dS (atomic or separate dQ, or "auto" below its length or over its size)."""
    m, n = cfg.model, cfg.data.max_seq_len
    if m.arch != "hstu" or m.attention_dq_mode in ("atomic", "separate"):
        return 0.0
    h_local = max(m.num_heads // tensor, 1) if m.num_heads % tensor == 0 else m.num_heads
    values = stored_ds_elements(max(1, tokens // n), h_local, n, STORED_DS_SLAB)
    if m.attention_dq_mode == "auto" and not auto_stores_ds(n, values * (2 if m.dtype == "bfloat16" else 4)):
        return 0.0
    return float(values)


def all_to_all_slots(cfg: Config, tokens: int, expert: int) -> int:
    """Rows one device receives (and sends) per MoE layer with ``moe.dispatch=all_to_all``
    over ``expert`` devices: expert x slots, slots = every local copy when
    ``capacity_factor`` is 0, else ceil(factor x copies / expert)."""
    copies = tokens * cfg.model.moe.top_k
    cf = cfg.model.moe.capacity_factor
    slots = copies if cf <= 0 else min(copies, max(1, -(-int(cf * copies) // expert)))
    return expert * slots


def moe_block_floats(cfg: Config, tokens: int, expert: int = 1) -> float:
    """Values of the ``blocked`` MoE routing's per-block expert-weight copies, all layers;
    with the all-to-all dispatch also its send, receive and return buffers (rows x D each)."""
    m = cfg.model
    if m.ffn != "moe":
        return 0.0
    from genrec_jax.model.moe import block_rows

    e, copies, extra = m.moe.num_experts, tokens * m.moe.top_k, 0.0
    if m.moe.dispatch == "all_to_all" and expert > 1 and m.moe.num_experts % expert == 0:
        copies = all_to_all_slots(cfg, tokens, expert)  # the rows this device's experts run
        e //= expert
        extra = m.num_layers * 3.0 * copies * m.embed_dim
    if m.moe.routing != "blocked":
        return extra
    rows = block_rows(copies, e, m.moe.block_size)
    blocks = -(-(copies + e * (rows - 1)) // rows)
    layers = 1 if m.moe.remat_blocks else m.num_layers
    return float(layers * 2 * blocks * m.embed_dim * m.moe.expert_dim) + extra


def make_plan(cfg: Config, mesh: dict[str, int], *, num_items: int, attention: str = "xla") -> Plan:
    leaves = _leaves_with_axes(abstract_params(cfg, num_items))
    total = sum(math.prod(s) for _, s, _ in leaves)
    item_table = sum(math.prod(s) for p, s, _ in leaves if "item_emb" in p)
    per_dev = sum(math.prod(s) / shard_factor(s, a, mesh) for _, s, a in leaves) * 4.0
    dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    tokens = max(1, cfg.data.batch_size * cfg.data.max_seq_len // dp)
    ds = stored_ds_floats(cfg, tokens, mesh["tensor"]) if attention == "triton" else 0.0
    act_bytes = (activation_floats_per_token(cfg, attention, mesh["tensor"]) * tokens
                 + moe_block_floats(cfg, tokens, mesh["expert"]) + ds) * (2 if cfg.model.dtype == "bfloat16" else 4)
    return Plan(
        num_params=int(total), num_params_item_table=int(item_table), mesh=dict(mesh),
        bytes_params=per_dev, bytes_grads=per_dev, bytes_optimizer=2 * per_dev, bytes_activations=act_bytes,
        flops_per_token_forward=float(flops_per_token(cfg, num_items)), tokens_per_device=tokens,
    )


def format_plan(plan: Plan, device_memory_gb: float) -> str:
    g = lambda b: f"{b / GIB:10.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a}={plan.mesh[a]}" for a in MESH_AXES)
    lines = [
        f"mesh                      {mesh}  ({math.prod(plan.mesh.values())} devices)",
        f"parameters                {plan.num_params:,} ({plan.num_params / 1e9:.2f} B; item table {plan.num_params_item_table / 1e9:.2f} B)",
        f"FLOPs per token           {plan.flops_per_token_forward / 1e9:.3f} GFLOP forward, {plan.flops_per_token_train / 1e9:.3f} GFLOP train step",
        f"tokens per device / step  {plan.tokens_per_device:,}",
        "per device:",
        f"  params (fp32)          {g(plan.bytes_params)}",
        f"  gradients (fp32)       {g(plan.bytes_grads)}",
        f"  AdamW moments (fp32)   {g(plan.bytes_optimizer)}",
        f"  activations            {g(plan.bytes_activations)}",
        f"  total                  {g(plan.bytes_total)}   (device memory {device_memory_gb:.0f} GiB)",
    ]
    return "\n".join(lines)


def dry_run_main(cfg: Config, *, device_memory_gb: float = 80.0, mesh_arg: str | None = None,
                 out=sys.stdout) -> int:
    """Print the plan; exit code 3 (with advice) when it does not fit the device memory."""
    devices = math.prod(max(getattr(cfg.mesh, a), 1) for a in MESH_AXES)
    if any(getattr(cfg.mesh, a) == -1 for a in MESH_AXES):
        raise ConfigError("--dry-run needs every mesh axis sized explicitly (e.g. --mesh data=64,fsdp=8,tensor=4,expert=8)")
    mesh = mesh_shape(cfg.mesh, devices)
    num_items = cfg.data.synthetic.num_items
    if cfg.data.dataset != "synthetic":
        print(f"note: planning with the catalogue size data.synthetic.num_items={num_items:,}", file=out)
    plan = make_plan(cfg, mesh, num_items=num_items, attention="triton" if cfg.model.attention_backend == "triton" else "xla")
    print(format_plan(plan, device_memory_gb), file=out)
    if plan.bytes_total > device_memory_gb * GIB:
        parts = {"params+grads+optimizer": plan.bytes_params * 4, "activations": plan.bytes_activations}
        worst = max(parts, key=parts.get)
        advice = ("shard the parameters further (larger fsdp / tensor / expert axes)" if worst != "activations"
                  else "lower data.batch_size or data.max_seq_len, use the Triton attention kernel, or add data/fsdp devices")
        print(f"\nDOES NOT FIT: {plan.bytes_total / GIB:.1f} GiB per device > {device_memory_gb:.0f} GiB "
              f"(largest part: {worst}); {advice}.", file=out)
        return 3
    print(f"\nfits: {plan.bytes_total / GIB:.1f} GiB of {device_memory_gb:.0f} GiB per device", file=out)
    return 0


__all__ = ["Plan", "make_plan", "dry_run_main", "flops_per_token", "np"]

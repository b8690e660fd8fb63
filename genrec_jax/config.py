"""Typed configuration: dataclass sections, YAML presets and ``key=value`` overrides.

A preset in ``configs/`` is a YAML file whose top-level keys are the sections below.
Missing keys take the dataclass defaults; unknown keys, wrong types and impossible values
fail at load time with a message naming the key and the file (or the override) they came
from. Each component receives only the section it needs (``cfg.model``, ``cfg.train``...).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 1000
    num_clusters: int = 10
    num_categories: int = 20
    num_tags: int = 64
    min_len: int = 8
    max_len: int = 60
    zipf_exponent: float = 1.1
    markov_weight: float = 0.6
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    dataset: Literal["synthetic", "amazon", "movielens"] = "synthetic"
    # Directory holding the data set folder; falls back to $GENREC_DATA_DIR.
    data_dir: str | None = None
    # Folder inside data_dir (amazon: "amazon-beauty"; movielens: "ml-1m").
    subdir: str | None = None
    max_seq_len: int = 50
    batch_size: int = 128
    # Padded-length buckets for training batches (each a compiled shape).
    bucket_sizes: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    # Events the model (and the baselines) train on. "train": all but each user's last two
    # (the validation target stays unseen, so periodic validation is meaningful);
    # "train+valid": all but the last (the test target), for the final test numbers; no
    # periodic validation then, since the validation targets are training data.
    fit: Literal["train", "train+valid"] = "train"

    def resolved_dir(self) -> Path | None:
        base = self.data_dir or os.environ.get("GENREC_DATA_DIR")
        if base is None:
            return None
        sub = self.subdir or {"amazon": "amazon-beauty", "movielens": "ml-1m"}.get(self.dataset, "")
        return Path(base).expanduser() / sub


@dataclasses.dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 256
    # All dropless and equal on the same routing (see model/moe.py): "blocked" (expert
    # groups padded to blocks of `block_size` rows, one batched matmul), "dropless"
    # (jax.lax.ragged_dot, which XLA expands to E x the FLOPs), "dense" (every expert on
    # every token).
    routing: Literal["blocked", "dropless", "dense"] = "blocked"
    block_size: int = 512
    # blocked: recompute the per-block expert-weight copies (and the expert matmuls) in the
    # backward pass instead of keeping them: blocks x D x F x 2 values less per layer, one
    # more forward of the experts. For many experts over few tokens per device (xl).
    remat_blocks: bool = False
    # blocked: the grouped matmuls of the expert blocks. "xla" copies each block's expert
    # weights (one-hot product) and runs a batched matmul; "triton" reads them in place
    # (kernels/grouped_matmul.py; CUDA + jax-triton); "auto" = triton where it can run.
    # Under a mesh that splits experts or hidden units (expert / tensor > 1) without the
    # all-to-all dispatch the routing is global, and XLA's formulation is used.
    kernel: Literal["auto", "xla", "triton"] = "xla"
    # With the `expert` mesh axis > 1 (and `tensor` 1): "xla" leaves the token movement to
    # XLA's partitioner (the global routing, placed by XLA); "all_to_all" routes each
    # device's own tokens and sends every token copy to the device holding its expert and
    # back with two explicit all-to-alls (shard_map), GShard-style.
    dispatch: Literal["xla", "all_to_all"] = "xla"
    # all_to_all: slots per (sender, receiving device) = ceil(factor x local copies / expert
    # devices); copies past them are dropped (counted in the log as moe_dropped). 0 = room
    # for every copy on every device: dropless, and equal to the other routings, but the
    # static buffers (and the expert work on them) are then `expert` times the real copies.
    capacity_factor: float = 0.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001


@dataclasses.dataclass
class MultiScaleConfig:
    enabled: bool = False
    # The most recent `short_len` events stay as tokens; older ones are mean-pooled
    # into windows of `long_window` events (at most `max_long_tokens` windows).
    short_len: int = 32
    long_window: int = 8
    max_long_tokens: int = 16
    num_context_tokens: int = 2
    user_profile_dim: int = 16


@dataclasses.dataclass
class TaskHeadsConfig:
    enabled: bool = False
    # engagement: P(like|share|purchase); retention: P(not skip); monetization:
    # P(purchase); watch: regression on watch ratio.
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["engagement", "retention", "monetization", "watch"])
    hidden_dim: int = 128
    interaction: bool = True  # DLRM-style pairwise interaction feeding the heads
    # M-FALCON training: the last events of each training row become candidate tokens
    # (they see the history and themselves only) labelled with their actions.
    num_candidates: int = 4


@dataclasses.dataclass
class DecoderConfig:
    enabled: bool = False
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 256
    use_moe: bool = False
    dropout: float = 0.1
    # Folder with the RQ-VAE's item -> code table (codes.npy); default: <run dir>/semantic_ids.
    codes_dir: str | None = None
    # Encoder positions per sequence trained with the decoder loss (the last one always;
    # 0 = every position).
    positions_per_seq: int = 4
    # --- semantic-ID generation (added with genrec_jax.semantic_ids)
    # Beams kept per level by the trie-constrained beam search (raised to k when smaller).
    beam_width: int = 20
    # Weight of an unlikelihood term on one history item per trained position: the decoder
    # learns how unlikely re-recommending a seen item is (0 = off). It penalises the item's
    # last `unlikelihood_levels` codes given its earlier ones, so items that only share a
    # prefix with the history are not pushed down.
    history_unlikelihood: float = 0.0
    unlikelihood_levels: int = 1
    unlikelihood_positions: int = 8  # trained positions per sequence that get the term (0 = all)
    # Repeat-aware decoding: a learnt logit offset per level for the codes that continue the
    # prefix into an item of the user's own history (trained with the cross entropy; beam
    # search, evaluation and serving apply it). Learns "users do not buy the same item twice"
    # (or the opposite) from the data instead of a serving-time history filter.
    history_bias: bool = False
    # What the offset marks at level t: "item" -- the code completes the path of one of the
    # user's history items (the child holds that single item: the level where its path becomes
    # unique, and every level below); "prefix" -- some history item lies under the child.
    history_bias_mode: Literal["item", "prefix"] = "item"
    # Levels that get the offset: the last `history_bias_levels`; 0 = every level.
    history_bias_levels: int = 0
    # How the offsets train. "joint": the decoder's loss sees the offset logits, so the rest
    # of the model co-adapts to them. "detached": the offsets are fitted on the decoder's
    # logits held fixed (stop-gradient) while every other weight gets exactly the gradient it
    # would get without the option -- a calibration learnt alongside training, which leaves
    # how the rest of the model learns unchanged. (Beam search still changes: on Beauty,
    # offsets on every level cut seen items' branches early and lost to last level only.)
    history_bias_train: Literal["joint", "detached"] = "joint"
    # Offset in logits = this x its parameter. Adam moves a parameter by about the learning
    # rate per step, so this sets how far the offsets can travel in a run: a catalogue where
    # nobody repeats an item (the best offset is -inf) wants a large one.
    history_bias_scale: float = 10.0


@dataclasses.dataclass
class ModelConfig:
    arch: Literal["hstu", "sasrec"] = "hstu"
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    attn_dim: int = 32  # per-head query/key width
    linear_dim: int = 32  # per-head value/gate width (HSTU); SASRec uses embed_dim // num_heads
    dropout: float = 0.2
    attn_dropout: float = 0.0
    # HSTU divides SiLU attention by n. "max_len": n = max sequence length (a constant,
    # so a token's output never depends on later tokens); "causal_count": n = number of
    # keys the query sees (also causal).
    attn_norm: Literal["max_len", "causal_count"] = "max_len"
    rab_position: bool = True
    rab_time: bool = True
    num_time_buckets: int = 64
    time_embedding: bool = True  # input embedding of the bucketed gap to the previous event
    action_embedding: bool = True
    position_embedding: bool = True
    l2_norm: bool = True  # cosine scoring with a temperature (HSTU's retrieval setting)
    temperature: float = 0.05
    ffn: Literal["none", "dense", "moe"] = "none"
    ffn_dim: int = 256
    group_norm: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention_backend: Literal["auto", "xla", "triton"] = "auto"
    # XLA attention only: recompute the [B, H, N, N] scores in the backward pass
    # (jax.checkpoint) instead of keeping them from the forward; the Triton kernels always
    # recompute.
    attention_remat: bool = False
    # XLA attention only: blocks of this many queries, each scored against the keys up to
    # the block's end instead of all N (causal attention sees no later key): (C + 1) / (2 C)
    # of the [N, N] score work with C blocks. Same outputs up to float summation order.
    # 0 = the dense [N, N] form.
    attention_query_block: int = 128
    # Triton kernels only: how the backward computes dQ. "atomic": the key-major kernel adds it
    # with float32 atomics; "separate": a query-major kernel recomputes the scores;
    # "stored": the key-major kernel also writes dS and one product per tile gives dQ
    # (deterministic; a dS buffer of about B * H * N^2 / 2 values per layer's backward);
    # "auto": stored for sequences of 1,024 and more while that buffer is at most 4 GiB.
    attention_dq_mode: Literal["auto", "atomic", "separate", "stored"] = "auto"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    multiscale: MultiScaleConfig = dataclasses.field(default_factory=MultiScaleConfig)
    tasks: TaskHeadsConfig = dataclasses.field(default_factory=TaskHeadsConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)


@dataclasses.dataclass
class DPOConfig:
    beta: float = 0.1
    # Checkpoint of the frozen reference model (defaults to the run's own --resume point).
    reference: str | None = None
    num_steps: int = 200
    learning_rate: float = 1e-4


@dataclasses.dataclass
class TrainConfig:
    stage: Literal["ugt", "rqvae", "dpo"] = "ugt"
    num_steps: int = 2000
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    max_grad_norm: float = 1.0
    # "softmax": full softmax over the catalogue; "sampled_softmax": shared negatives
    # drawn from the popularity distribution with log-Q correction.
    loss: Literal["softmax", "sampled_softmax"] = "softmax"
    num_negatives: int = 512
    # Operand dtype of the sampled softmax's [B, N, K] logit product and of its gradient's two
    # products (float32 accumulation either way). bfloat16 runs them on the tensor cores at
    # full rate; float32 operands run as TF32 on GPUs.
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    contrastive_weight: float = 0.0  # lambda_1 of the in-batch InfoNCE term
    multitask_weight: float = 1.0
    decoder_weight: float = 1.0
    retrieval_weight: float = 1.0
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)


@dataclasses.dataclass
class EvalConfig:
    ks: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 20, 50])
    exclude_history: bool = False
    batch_size: int = 512
    # Users evaluated by the periodic (validation) evaluation during training; 0 = all.
    max_users: int = 0
    baselines: bool = True


@dataclasses.dataclass
class MeshConfig:
    # Sizes of the four mesh axes; -1 = take all remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclasses.dataclass
class RQVAEConfig:
    codebook_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 256, 256])
    latent_dim: int = 32
    hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [256, 128])
    commitment_weight: float = 0.25
    num_steps: int = 3000
    batch_size: int = 1024
    learning_rate: float = 1e-3
    dead_code_every: int = 200  # restart unused codes every this many steps (0 = never)
    # Where item content vectors come from: "content" (data set features), "cooccurrence"
    # (item-item co-occurrence factorisation), or "file" (an .npy matrix, path below).
    features: Literal["content", "cooccurrence", "file"] = "content"
    features_path: str | None = None
    seed: int = 0
    # --- added with genrec_jax.semantic_ids
    cooccurrence_dim: int = 64  # SVD width of the "cooccurrence" item vectors
    cooccurrence_window: int = 3  # events apart that still count as co-occurring
    # Codes of the final de-duplication level; 0 = max(2 x largest collision group, 8),
    # leaving room for cold-start items.
    dedup_size: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000  # RQ-VAE checkpoints for --resume (0 = only the last)


@dataclasses.dataclass
class ServeConfig:
    batch_buckets: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16, 64])
    seq_buckets: list[int] = dataclasses.field(default_factory=lambda: [16, 64])
    max_wait_ms: float = 2.0
    # Jobs waiting for a batch; more get 503 at once. Past saturation a deep queue turns
    # quick refusals into slow answers and timeouts (bench/serve_load.py, tiny model, 2 CPU
    # cores, 800 req/s offered, ~400/s sustainable: 1024 -> admitted p99 3.0 s and 930
    # 504s; 128 -> 3.2 s; 64 -> 0.96 s; 32 -> 0.27-0.58 s; no 504s at 64 or 32). Keep it at
    # least the largest batch bucket so full batches can form; raise both together on a GPU.
    queue_size: int = 64
    # Past what one event loop can parse, requests wait unread in socket buffers, where no
    # queue bound sees them. The server samples its event loop's lag every few ms and, while
    # it exceeds this, refuses model requests with 503 before parsing them (0: never).
    max_loop_lag_ms: float = 100.0
    # Model requests (recommend, rank) admitted and not yet answered; more are refused with
    # 503 ("busy") in the app before their body is read, keeping the connection open.
    # uvicorn's own limit (serve.py --limit-concurrency) refuses by closing connections, and
    # those refusals were slow under overload (README, Known limits). 0: no cap in the
    # single-process server; with HTTP front ends (http_workers >= 2) each gets two of the
    # largest batches divided among them, at least 16 (serve/frontend.py: inflight_cap).
    max_inflight: int = 0
    # Latency (ms, 90th percentile of admitted model requests, as the server measures them)
    # that the in-flight limit adapts to hold past saturation: it shrinks below max_inflight
    # (or the front ends' share, or in one process two of the largest batches) while answers
    # are slower than this, and grows back when they are not (serve/app.py: InflightLimit).
    # 0: the fixed cap alone. Set it above the p90 seen at light load.
    target_latency_ms: float = 0.0
    # Python's GIL hand-over interval while the server runs (sys.setswitchinterval; 0 keeps
    # Python's 5 ms). The batcher thread's host work and the event loop share the GIL: each
    # time the loop waits on I/O the batcher may keep the GIL for up to this long.
    gil_switch_interval_ms: float = 0.5
    # HTTP front-end processes (serve.py --workers). 0 or 1: one process parses HTTP and runs
    # the engine. N >= 2: N processes parse and validate requests and forward them over a
    # Unix socket to one engine process (serve/supervisor.py), so that HTTP work does not
    # share a Python interpreter with the batcher.
    http_workers: int = 0
    timeout_ms: float = 1000.0
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    prefix_cache_users: int = 10000
    beam_width: int = 16
    max_k: int = 100
    rank_micro_batch: int = 256
    max_candidates: int = 2048
    max_body_bytes: int = 1_000_000
    # --- added with genrec_jax.serve
    # New tokens per returning-user request computed against the prefix cache (each a
    # compiled shape); a request with more new events than the largest is recomputed whole.
    extend_buckets: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    max_history_len: int = 1024  # events per request (the model sees the most recent max_len)
    max_exclude: int = 1024  # distinct excluded items per request (exclude_items + history)
    prefix_cache_mb: float = 1024.0  # device memory of the per-user K/V cache (also <= prefix_cache_users)
    cold_start_capacity: int = 1024  # items POST /v1/items may add (the item table is padded to fit them)
    # Retrieval requests without a user_id run encode + top-k as one compiled step that
    # writes nothing to the K/V pool (nothing to cache without a user); false: through the
    # pool like every other request (same results; one more dispatch and the K/V writes).
    direct_recommend: bool = True
    # Requests that need only the user vector (retrieval, and prefill without a decoder
    # memory) run the last layer's attention and FFN for the last event only (exact;
    # ``Recommender.encode_last``). false: the full last layer (for comparison).
    last_token_only: bool = True
    # Batches dispatched to the device and not yet answered (genrec_jax.serve.batcher): 2
    # overlaps one batch's host work with another's device work (more throughput when the
    # device bounds it: long histories, beam search; each batch also waits for the one
    # before it); 1 runs them one at a time. Measured in README (Results, Serving).
    pipeline_depth: int = 1
    # POST /v1/recommend and /v1/rank answered by a plain ASGI handler (serve/app.py:
    # LeanRoutes) with the same validation, errors and metrics as the FastAPI routes, which
    # still carry the OpenAPI schema and answer these paths when this is false.
    lean_routes: bool = True
    # With HTTP front ends: each keeps a copy of the catalogue (fetched from the engine
    # process once it is ready) and parses histories and rank candidates itself, sending the
    # engine process packed internal ids (serve/ipc.py). The engine process runs under one
    # interpreter lock, so its per-event parsing bounded its request rate. Costs each front
    # end the catalogue's ids in memory (about 100 bytes per item). false: the engine parses.
    resolve_in_frontends: bool = True


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rqvae: RQVAEConfig = dataclasses.field(default_factory=RQVAEConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str, source: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {key}: {msg}")


def validate(cfg: Config, source: str = "<config>") -> Config:
    """Cross-field checks that types alone cannot express."""
    d, m, t = cfg.data, cfg.model, cfg.train
    pos = lambda v: v > 0  # noqa: E731
    for key, val in [
        ("data.max_seq_len", d.max_seq_len),
        ("data.batch_size", d.batch_size),
        ("model.embed_dim", m.embed_dim),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
        ("model.attn_dim", m.attn_dim),
        ("model.linear_dim", m.linear_dim),
        ("train.num_steps", t.num_steps),
        ("eval.batch_size", cfg.eval.batch_size),
    ]:
        _check(pos(val), key, f"must be > 0, got {val}", source)
    _check(d.max_seq_len >= 2, "data.max_seq_len", "must be >= 2", source)
    _check(all(b > 0 for b in d.bucket_sizes), "data.bucket_sizes", "sizes must be > 0", source)
    _check(sorted(d.bucket_sizes) == list(d.bucket_sizes), "data.bucket_sizes", "must be increasing", source)
    for key, val in [("model.dropout", m.dropout), ("model.attn_dropout", m.attn_dropout)]:
        _check(0.0 <= val < 1.0, key, f"must be in [0, 1), got {val}", source)
    _check(m.temperature > 0, "model.temperature", "must be > 0", source)
    _check(m.attention_query_block >= 0, "model.attention_query_block",
           "must be >= 0 (0 = the dense [N, N] attention)", source)
    if m.arch == "sasrec":
        _check(
            m.embed_dim % m.num_heads == 0,
            "model.num_heads",
            f"must divide model.embed_dim ({m.num_heads} does not divide {m.embed_dim})",
            source,
        )
    if m.ffn == "moe":
        _check(m.moe.num_experts >= 1, "model.moe.num_experts", "must be >= 1", source)
        _check(
            1 <= m.moe.top_k <= m.moe.num_experts,
            "model.moe.top_k",
            f"must be in [1, num_experts={m.moe.num_experts}], got {m.moe.top_k}",
            source,
        )
        _check(m.moe.block_size >= 1, "model.moe.block_size", "must be >= 1", source)
        _check(m.moe.dispatch in ("xla", "all_to_all"), "model.moe.dispatch",
               f"must be 'xla' or 'all_to_all', got {m.moe.dispatch!r}", source)
        _check(m.moe.capacity_factor >= 0, "model.moe.capacity_factor",
               f"must be >= 0 (0 = dropless), got {m.moe.capacity_factor}", source)
    ms = m.multiscale
    if ms.enabled:
        _check(ms.short_len >= 1, "model.multiscale.short_len", "must be >= 1", source)
        _check(ms.long_window >= 1, "model.multiscale.long_window", "must be >= 1", source)
    known_tasks = {"engagement", "retention", "monetization", "watch"}
    bad = [x for x in m.tasks.tasks if x not in known_tasks]
    _check(not bad, "model.tasks.tasks", f"unknown task(s) {bad}; known: {sorted(known_tasks)}", source)
    _check(0 < t.warmup_steps <= t.num_steps or t.warmup_steps == 0, "train.warmup_steps",
           f"must be in [0, train.num_steps={t.num_steps}]", source)
    _check(t.learning_rate > 0, "train.learning_rate", "must be > 0", source)
    _check(t.num_negatives > 0, "train.num_negatives", "must be > 0", source)
    _check(t.dpo.beta > 0, "train.dpo.beta", "must be > 0", source)
    _check(all(k > 0 for k in cfg.eval.ks), "eval.ks", "must be positive", source)
    for axis in ("data", "fsdp", "tensor", "expert"):
        v = getattr(cfg.mesh, axis)
        _check(v == -1 or v >= 1, f"mesh.{axis}", f"must be -1 (all remaining devices) or >= 1, got {v}", source)
    _check(sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor", "expert")) <= 1,
           "mesh", "at most one axis may be -1", source)
    r = cfg.rqvae
    _check(len(r.codebook_sizes) >= 1 and all(c >= 2 for c in r.codebook_sizes), "rqvae.codebook_sizes",
           "needs at least one level, each with >= 2 codes", source)
    _check(0.0 <= r.commitment_weight, "rqvae.commitment_weight", "must be >= 0", source)
    for key, val in [("rqvae.latent_dim", r.latent_dim), ("rqvae.num_steps", r.num_steps),
                     ("rqvae.batch_size", r.batch_size), ("rqvae.cooccurrence_dim", r.cooccurrence_dim),
                     ("rqvae.cooccurrence_window", r.cooccurrence_window), ("rqvae.log_every", r.log_every)]:
        _check(val > 0, key, f"must be > 0, got {val}", source)
    _check(all(h > 0 for h in r.hidden_dims), "rqvae.hidden_dims", "sizes must be > 0", source)
    _check(r.learning_rate > 0, "rqvae.learning_rate", "must be > 0", source)
    _check(r.dead_code_every >= 0, "rqvae.dead_code_every", "must be >= 0", source)
    _check(r.checkpoint_every >= 0, "rqvae.checkpoint_every", "must be >= 0", source)
    _check(r.dedup_size >= 0, "rqvae.dedup_size", "must be >= 0 (0 = automatic)", source)
    _check(r.features != "file" or bool(r.features_path), "rqvae.features_path",
           "rqvae.features=file needs the path of an .npy item matrix", source)
    dc = m.decoder
    if dc.enabled:
        for key, val in [("model.decoder.num_layers", dc.num_layers), ("model.decoder.num_heads", dc.num_heads),
                         ("model.decoder.head_dim", dc.head_dim), ("model.decoder.ffn_dim", dc.ffn_dim),
                         ("model.decoder.beam_width", dc.beam_width)]:
            _check(val > 0, key, f"must be > 0, got {val}", source)
        _check(0.0 <= dc.dropout < 1.0, "model.decoder.dropout", f"must be in [0, 1), got {dc.dropout}", source)
        _check(dc.positions_per_seq >= 0, "model.decoder.positions_per_seq", "must be >= 0 (0 = every position)",
               source)
        _check(dc.history_bias_mode in ("item", "prefix"), "model.decoder.history_bias_mode",
               f"must be 'item' or 'prefix', got {dc.history_bias_mode!r}", source)
        _check(dc.history_bias_levels >= 0, "model.decoder.history_bias_levels",
               f"must be >= 0 (0 = every level), got {dc.history_bias_levels}", source)
        _check(dc.history_bias_train in ("joint", "detached"), "model.decoder.history_bias_train",
               f"must be 'joint' or 'detached', got {dc.history_bias_train!r}", source)
        _check(dc.history_bias_scale > 0, "model.decoder.history_bias_scale",
               f"must be > 0, got {dc.history_bias_scale}", source)
        if dc.use_moe:
            _check(1 <= m.moe.top_k <= m.moe.num_experts, "model.moe.top_k",
                   f"must be in [1, num_experts={m.moe.num_experts}], got {m.moe.top_k}", source)
    _check(t.retrieval_weight >= 0 and t.decoder_weight >= 0, "train.retrieval_weight",
           "loss weights must be >= 0", source)
    _check(t.retrieval_weight > 0 or (dc.enabled and t.decoder_weight > 0), "train.retrieval_weight",
           "is 0 (decoder-only training) but the decoder is off: set model.decoder.enabled=true "
           "and train.decoder_weight > 0", source)
    s = cfg.serve
    _check(sorted(s.batch_buckets) == list(s.batch_buckets) and all(b > 0 for b in s.batch_buckets),
           "serve.batch_buckets", "must be positive and increasing", source)
    _check(sorted(s.seq_buckets) == list(s.seq_buckets) and all(b > 0 for b in s.seq_buckets),
           "serve.seq_buckets", "must be positive and increasing", source)
    _check(s.queue_size > 0, "serve.queue_size", "must be > 0", source)
    _check(s.pipeline_depth >= 1, "serve.pipeline_depth", f"must be >= 1, got {s.pipeline_depth}", source)
    _check(0 <= s.gil_switch_interval_ms <= 100, "serve.gil_switch_interval_ms",
           "must be in [0, 100] (0 keeps Python's default of 5 ms)", source)
    _check(s.max_loop_lag_ms >= 0, "serve.max_loop_lag_ms", "must be >= 0 (0 turns lag shedding off)", source)
    _check(s.max_inflight >= 0, "serve.max_inflight", f"must be >= 0 (0: no fixed cap), got {s.max_inflight}", source)
    _check(s.target_latency_ms >= 0, "serve.target_latency_ms",
           f"must be >= 0 (0: no adaptive in-flight limit), got {s.target_latency_ms}", source)
    _check(0 <= s.http_workers <= 256, "serve.http_workers",
           f"must be in [0, 256] (0 or 1: a single process), got {s.http_workers}", source)
    _check(sorted(s.extend_buckets) == list(s.extend_buckets) and all(b > 0 for b in s.extend_buckets),
           "serve.extend_buckets", "must be positive and increasing", source)
    for key, val in [("serve.max_k", s.max_k), ("serve.beam_width", s.beam_width),
                     ("serve.rank_micro_batch", s.rank_micro_batch), ("serve.max_candidates", s.max_candidates),
                     ("serve.max_body_bytes", s.max_body_bytes), ("serve.max_history_len", s.max_history_len),
                     ("serve.max_exclude", s.max_exclude), ("serve.timeout_ms", s.timeout_ms)]:
        _check(val > 0, key, f"must be > 0, got {val}", source)
    _check(s.max_wait_ms >= 0 and s.prefix_cache_users >= 0 and s.prefix_cache_mb >= 0 and s.cold_start_capacity >= 0,
           "serve", "max_wait_ms, prefix_cache_users, prefix_cache_mb and cold_start_capacity must be >= 0", source)
    return cfg


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently coerce, e.g. int -> float) ``value`` against type ``tp``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str, source: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(where + u for u in unknown)}; "
            f"valid keys of {prefix or 'the top level'}: {', '.join(sorted(fields))}"
        )
    obj = base if base is not None else cls()
    for name, val in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(val, dict):
            setattr(obj, name, _build(tp, val, key, source, base=current))
        else:
            setattr(obj, name, _coerce(val, tp, key, source))
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.num_layers=4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: cannot parse value: {e}") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    cfg = Config()
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.exists():
            presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))) if PRESET_DIR.exists() else ""
            raise ConfigError(f"config file {path} does not exist (presets in configs/: {presets})")
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        cfg = _build(Config, raw, "", source, base=cfg)
    for item in overrides or []:
        keys, value = _parse_override(item)
        cfg = _build(Config, _nest(keys, value), "", f"--set {item}", base=cfg)
    return validate(cfg, source if not overrides else f"{source} (with --set overrides)")


def config_from_dict(values: dict, source: str = "<dict>") -> Config:
    return validate(_build(Config, values, "", source, base=Config()), source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_path(name: str) -> Path:
    """Path of a preset by name (``tiny``, ``synthetic``, ...), also from an installed package."""
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"no preset named {name!r} in {PRESET_DIR}")
    return p

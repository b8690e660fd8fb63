"""HSTU pointwise attention: the one function the model calls, with a pure-JAX reference.

For query token i and key token j of one sequence (heads handled independently):

    A[i, j] = SiLU(alpha * <q_i, k_j> + rab(i, j)) / n(i)   if mask(i, j) else 0
    out_i   = sum_j A[i, j] v_j

* mask(i, j): j is a valid key and j <= i (causal). With M-FALCON targets (the last
  ``num_targets`` tokens of a sequence are candidates), a target sees every history
  token and itself only, never another candidate.
* rab(i, j) = pos_bias[p(i) - p(j)] + time_bias[bucket(t_query(i) - t(j))], where p is the
  token's position (candidates all sit at the position right after the history) and
  t_query(i) is the time at which token i's prediction is made (the next event's time).
* n(i) is the constant max length ("max_len", the HSTU paper's choice) or the number of
  keys token i sees ("causal_count"). Both keep causality: a token's output never
  depends on later tokens, which is what makes the serving prefix cache exact.

The reference materialises the [B, H, N, N] attention matrix; the Triton kernels in
``genrec_jax.kernels`` compute the same function tile by tile, and ``backend`` picks one.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Backend = Literal["auto", "xla", "triton"]


# --------------------------------------------------------------------------- helpers


def time_bucket(delta_seconds: jax.Array, num_buckets: int) -> jax.Array:
    """Bucket a non-negative time gap (seconds) logarithmically into ``0..num_buckets-1``.

    bucket = floor(log2(1 + dt) * 2) (half-octave buckets: 1 s, ~1.4 s, 2 s, ... capped), so
    64 buckets span gaps up to about 2^32 s.
    """
    dt = jnp.maximum(delta_seconds, 0).astype(jnp.float32)
    # log(x) / log(2), not jnp.log2: newer jax has a log2 primitive that the ONNX exporter
    # does not know, and this keeps the bucket boundaries identical across jax versions.
    x = 1.0 + dt
    b = jnp.floor(jnp.log(x) / jnp.log(jnp.asarray(2.0, x.dtype)) * 2.0).astype(jnp.int32)
    return jnp.clip(b, 0, num_buckets - 1)


def token_positions(lengths: jax.Array, n: int, num_targets: jax.Array | None) -> jax.Array:
    """Position of every token [B, N]: its index, with M-FALCON candidates clamped to the
    first candidate slot (each candidate is "the next item" after the same history)."""
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    if num_targets is None:
        return jnp.broadcast_to(idx, (lengths.shape[0], n))
    hist = (lengths - num_targets)[:, None]
    return jnp.minimum(idx, hist)


def attention_mask(
    lengths: jax.Array, n: int, num_targets: jax.Array | None = None, rows: tuple[int, int] | None = None
) -> jax.Array:
    """Boolean [B, N, N] mask (query i, key j) for self-attention over padded sequences;
    with ``rows=(s, e)`` only queries s..e-1 against keys 0..e-1, [B, e - s, e]."""
    s, e = rows or (0, n)
    i = jnp.arange(s, e)[:, None]
    j = jnp.arange(e)[None, :]
    valid_k = j < lengths[:, None, None]
    valid_q = i < lengths[:, None, None]
    mask = (j <= i) & valid_k & valid_q
    if num_targets is not None:
        hist = (lengths - num_targets)[:, None, None]
        key_is_target = j >= hist
        mask = mask & (~key_is_target | (i == j))
    return mask


@jax.custom_vjp
def table_lookup(table: jax.Array, idx: jax.Array) -> jax.Array:
    """``table[idx]`` for a small bias table, with a gradient that is not a scatter.

    The gradient of a gather is a scatter-add; into a table of a few dozen entries from
    B * N * N indices it serialises on atomics (on an H100, 72 ms against 2 ms for the rest
    of the attention backward at N = 1024). Here the table gradient is a fused
    compare-and-sum per entry instead: sum(g * (idx == t)) for every t.
    """
    return table[idx]


def _table_lookup_fwd(table, idx):
    return table[idx], (table, idx)


def _table_lookup_bwd(res, g):
    table, idx = res
    # Every layer looks up the same indices. Without the barrier XLA computes the comparison
    # [..., T] once for all of them and stores it (a 1 GB boolean array at the `base` shape,
    # written once and read by each layer's sum); tied to this call's gradient it is fused
    # into this call's sum and never stored.
    idx, g = jax.lax.optimization_barrier((idx, g))
    hit = idx[..., None] == jnp.arange(table.shape[0], dtype=idx.dtype)
    dt = jnp.sum(jnp.where(hit, g[..., None].astype(jnp.float32), 0.0), axis=tuple(range(idx.ndim)))
    return dt.astype(table.dtype), None


table_lookup.defvjp(_table_lookup_fwd, _table_lookup_bwd)


def toeplitz_position_bias(pos_bias: jax.Array, n: int) -> jax.Array:
    """[n, n] matrix T[i, j] = pos_bias[clip(i - j, 0, P - 1)] for tokens at positions 0..n-1.

    Built from the 2n - 1 distinct values by tile / reshape / slice (a Hankel matrix read
    right to left), so its gradient is a sum of shifted rows rather than a scatter-add.
    """
    num = pos_bias.shape[0]
    d = jnp.arange(2 * n - 1) - (n - 1)  # r[k] = bias at relative position k - (n - 1)
    r = pos_bias[jnp.clip(d, 0, num - 1)]
    flat = jnp.concatenate([jnp.tile(r, n), jnp.zeros((n,), r.dtype)])  # length 2 n^2
    hankel = flat.reshape(n, 2 * n)[:, :n]  # H[i, m] = r[i + m]
    return hankel[:, ::-1]  # T[i, j] = H[i, n - 1 - j] = r[n - 1 + i - j]


def relative_bias(
    q_pos: jax.Array,  # [B, Nq]
    k_pos: jax.Array,  # [B, Nk]
    pos_bias: jax.Array | None,  # [P] (P = max_len + 1), shared by heads
    q_time: jax.Array | None,  # [B, Nq] int64/int32 seconds
    k_time: jax.Array | None,  # [B, Nk]
    time_bias: jax.Array | None,  # [T] buckets
) -> jax.Array | None:
    """rab(i, j) as a [B, 1, Nq, Nk] float array (None when both tables are absent)."""
    out = None
    if pos_bias is not None:
        rel = jnp.clip(q_pos[:, :, None] - k_pos[:, None, :], 0, pos_bias.shape[0] - 1)
        out = pos_bias[rel]
    if time_bias is not None:
        out = _add(out, _time_bias(q_time, k_time, time_bias))
    return None if out is None else out[:, None, :, :]


def self_attention_bias(
    n: int,
    lengths: jax.Array,  # [B]
    num_targets: jax.Array | None,  # [B]
    pos_bias: jax.Array | None,
    q_time: jax.Array | None,  # [B, N]
    k_time: jax.Array | None,  # [B, N]
    time_bias: jax.Array | None,
    rows: tuple[int, int] | None = None,
) -> jax.Array | None:
    """rab(i, j) of self-attention over N tokens, [B or 1, 1, N, N]; equal to
    ``relative_bias`` on ``token_positions`` (tested) but without a scatter in its gradient.
    With ``rows=(s, e)``: queries s..e-1 against keys 0..e-1 only, [B or 1, 1, e - s, e].

    Without targets the position part is one Toeplitz matrix shared by the batch. With
    M-FALCON targets (history length h), rows i < h are that matrix and every candidate row
    is pos_bias[clip(h - j)] (keys j >= h give relative position 0 either way).
    """
    s, e = rows or (0, n)
    out = None
    if pos_bias is not None:
        toe = toeplitz_position_bias(pos_bias, n)[None, s:e, :e]  # [1, Q, K]
        if num_targets is None:
            out = toe
        else:
            hist = (lengths - num_targets)[:, None]  # [B, 1]
            j = jnp.arange(e)[None, :]
            row_h = pos_bias[jnp.clip(hist - j, 0, pos_bias.shape[0] - 1)]  # [B, K]
            is_hist_row = jnp.arange(s, e)[None, :, None] < hist[:, :, None]  # [B, Q, 1]
            out = jnp.where(is_hist_row, toe, row_h[:, None, :])
    if time_bias is not None:
        out = _add(out, _time_bias(q_time[:, s:e], k_time[:, :e], time_bias))
    return None if out is None else out[:, None, :, :]


def _add(a, b):
    return b if a is None else a + b


def _time_bias(q_time, k_time, time_bias):
    dt = q_time[:, :, None] - k_time[:, None, :]
    return table_lookup(time_bias, time_bucket(dt, time_bias.shape[0]))


# --------------------------------------------------------------------------- reference


def hstu_attention_dense(
    q: jax.Array,  # [B, Nq, H, Dqk]
    k: jax.Array,  # [B, Nk, H, Dqk]
    v: jax.Array,  # [B, Nk, H, Dv]
    mask: jax.Array,  # bool [B, Nq, Nk]
    bias: jax.Array | None,  # [B, 1 or H, Nq, Nk]
    *,
    alpha: float,
    norm: Literal["max_len", "causal_count"],
    max_len: int,
) -> jax.Array:
    """The reference math on an explicit mask and bias; returns [B, Nq, H, Dv]."""
    dtype = q.dtype
    # Results in the inputs' dtype (accumulation is float32 inside the product either way). A
    # float32 result would give every product of the backward pass a float32 operand (its
    # cotangent); with bfloat16 inputs all six products stay bfloat16 (README, Results).
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=dtype).astype(jnp.float32) * alpha
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    a = jax.nn.silu(s)
    m = mask[:, None, :, :]
    a = jnp.where(m, a, 0.0)
    if norm == "max_len":
        a = a / float(max_len)
    else:
        count = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1).astype(jnp.float32)
        a = a / count
    return jnp.einsum("bhqk,bkhd->bqhd", a.astype(dtype), v, preferred_element_type=dtype)


def hstu_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    alpha: float,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    num_targets: jax.Array | None = None,
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    query_timestamps: jax.Array | None = None,
) -> jax.Array:
    """Self-attention over padded sequences [B, N, H, D] with valid ``lengths`` [B]."""
    n = q.shape[1]
    mask = attention_mask(lengths, n, num_targets)
    bias = self_attention_bias(n, lengths, num_targets, pos_bias, query_timestamps, timestamps, time_bias)
    return hstu_attention_dense(q, k, v, mask, bias, alpha=alpha, norm=norm, max_len=max_len)


def query_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each block of ``block`` queries (the last one may be shorter)."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def hstu_attention_blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    alpha: float,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    num_targets: jax.Array | None = None,
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    query_timestamps: jax.Array | None = None,
    block: int = 128,
) -> jax.Array:
    """``hstu_attention_reference`` computed one block of ``block`` queries at a time, each
    against only the keys up to the block's last query.

    Query i sees keys j <= i only (M-FALCON targets see less), so the keys past a block's end
    contribute exact zeros to it: dropping them changes nothing but the order of the float
    sums. With C blocks the score tensors (products, bias, SiLU, mask, and all of their
    gradients) shrink to (C + 1) / (2 C) of the dense [N, N] form: 62.5% at N = 512 in blocks
    of 128. Every block is a static slice, so shapes stay static under jit; a symbolic
    sequence length (shape-polymorphic export) takes the dense form.
    """
    n = q.shape[1]
    if block <= 0 or not isinstance(n, int) or n <= block:  # symbolic lengths (ONNX export): dense
        return hstu_attention_reference(
            q, k, v, lengths, alpha=alpha, max_len=max_len, norm=norm, num_targets=num_targets,
            pos_bias=pos_bias, time_bias=time_bias, timestamps=timestamps, query_timestamps=query_timestamps)
    outs = []
    for s, e in query_blocks(n, block):
        mask = attention_mask(lengths, n, num_targets, rows=(s, e))  # [B, Q, K]
        bias = self_attention_bias(n, lengths, num_targets, pos_bias, query_timestamps, timestamps, time_bias,
                                   rows=(s, e))
        outs.append(hstu_attention_dense(q[:, s:e], k[:, :e], v[:, :e], mask, bias, alpha=alpha, norm=norm,
                                         max_len=max_len))
    return jnp.concatenate(outs, axis=1)


# --------------------------------------------------------------------------- dispatch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when a CUDA device is present and jax-triton imports (checked once)."""
    try:
        if not any(d.platform == "gpu" for d in jax.devices()):
            return False
        import jax_triton  # noqa: F401

        from genrec_jax.kernels import hstu_attention as _  # noqa: F401
    except Exception:  # any import or backend failure means: use the reference
        return False
    return True


def resolve_backend(backend: Backend, op: str = "attention") -> Literal["xla", "triton"]:
    """'xla' or 'triton' for ``backend``; ``op`` names the caller in the error message."""
    if backend == "xla":
        return "xla"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op} backend 'triton' needs a CUDA GPU and jax-triton "
                "(pip install 'genrec-jax[gpu]'); use backend 'auto' or 'xla' elsewhere"
            )
        return "triton"
    return "triton" if triton_available() else "xla"


# The Triton backward's dq_mode="auto" (kernels/hstu_attention.py) stores dS from this
# length on, while the buffer is at most the size below; "atomic" otherwise. H100, B=32 H=4
# D=128 bf16, forward+backward: stored 0.367 against 0.447 ms (atomic) at N=1024, 3.36-3.47
# against 3.81-3.83 ms at N=4096, 12.16 against 12.98 ms at N=8192; at the training shape
# (B=64 N=512 H=8 D=64, both biases) 0.868 against 0.879 ms, no gain (kernels/NOTES.md).
# Here, not in the kernels module, so that the dry-run planner can use it without triton.
STORED_DS_MIN_LEN = 1024
STORED_DS_AUTO_MAX_BYTES = 4 << 30


def stored_ds_elements(batch: int, heads: int, max_seq_len: int, slab: int) -> int:
    """Values of the dS buffer a stored-dS backward holds: per (sequence, head) one slab per
    key block of ``slab`` keys over the queries from the block on, T (T + 1) / 2 tiles of
    slab^2 with T = ceil(max_seq_len / slab)."""
    tiles = -(-max_seq_len // slab)
    return batch * heads * slab * slab * tiles * (tiles + 1) // 2


def auto_stores_ds(max_seq_len: int, ds_bytes: int) -> bool:
    """Whether dq_mode="auto" stores dS for sequences up to ``max_seq_len`` with a buffer of
    ``ds_bytes``."""
    return max_seq_len >= STORED_DS_MIN_LEN and ds_bytes <= STORED_DS_AUTO_MAX_BYTES


def hstu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    alpha: float | None = None,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    num_targets: jax.Array | None = None,
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    query_timestamps: jax.Array | None = None,
    backend: Backend = "auto",
    remat: bool = False,
    query_block: int = 0,
    dq_mode: Literal["auto", "atomic", "separate", "stored"] = "auto",
) -> jax.Array:
    """HSTU self-attention over padded sequences. q, k: [B, N, H, Dqk]; v: [B, N, H, Dv].

    ``lengths`` [B] valid tokens per row (the rest is padding and returns zeros);
    ``num_targets`` [B] optional M-FALCON candidates at the end of each row. XLA path only:
    ``remat`` makes the backward recompute the scores instead of keeping them;
    ``query_block`` > 0 computes blocks of that many queries against the keys up to each
    block's end (``hstu_attention_blocked``; 0 = the dense [N, N] reference). Triton path
    only: ``dq_mode`` picks how the backward computes dQ (``hstu_attention_triton``).
    """
    if alpha is None:
        alpha = 1.0 / math.sqrt(q.shape[-1])
    if time_bias is not None and (timestamps is None or query_timestamps is None):
        raise ValueError("time_bias needs both timestamps and query_timestamps")
    kwargs = dict(
        alpha=alpha,
        max_len=max_len,
        norm=norm,
        num_targets=num_targets,
        pos_bias=pos_bias,
        time_bias=time_bias,
        timestamps=timestamps,
        query_timestamps=query_timestamps,
    )
    if resolve_backend(backend) == "triton":
        from genrec_jax.kernels.hstu_attention import hstu_attention_triton
        from genrec_jax.sharding import per_shard

        # The kernel is opaque to XLA's partitioner: under a sharded jit, run it per shard
        # (batch rows over the data-parallel axes, heads over tensor).
        def call(q, k, v, lengths, num_targets, pos_bias, time_bias, timestamps, query_timestamps):
            return hstu_attention_triton(
                q, k, v, lengths, alpha=alpha, max_len=max_len, norm=norm, num_targets=num_targets,
                pos_bias=pos_bias, time_bias=time_bias, timestamps=timestamps, query_timestamps=query_timestamps,
                dq_mode=dq_mode)

        rows, seqs, heads = ("batch",), ("batch", None), ("batch", None, "heads", None)
        return per_shard(
            call,
            dict(q=q, k=k, v=v, lengths=lengths, num_targets=num_targets, pos_bias=pos_bias, time_bias=time_bias,
                 timestamps=timestamps, query_timestamps=query_timestamps),
            dict(q=heads, k=heads, v=heads, lengths=rows, num_targets=rows, pos_bias=(None,), time_bias=(None,),
                 timestamps=seqs, query_timestamps=seqs),
            heads,
        )
    xla = hstu_attention_reference
    if query_block > 0 and isinstance(q.shape[1], int) and q.shape[1] > query_block:
        xla = functools.partial(hstu_attention_blocked, block=int(query_block))
    if remat:  # the arrays stay arguments of the checkpointed function; the scalars are bound
        static = {name: kwargs.pop(name) for name in ("alpha", "max_len", "norm")}
        return jax.checkpoint(functools.partial(xla, **static))(q, k, v, lengths, **kwargs)
    return xla(q, k, v, lengths, **kwargs)


def hstu_attention_cached(
    q: jax.Array,  # [B, M, H, Dqk] new queries
    k_cache: jax.Array,  # [B, C, H, Dqk] keys: cached history followed by the new tokens
    v_cache: jax.Array,  # [B, C, H, Dv]
    q_positions: jax.Array,  # [B, M] index of each new query within the cache layout
    kv_lengths: jax.Array,  # [B] valid keys in the cache (history + new)
    *,
    alpha: float | None = None,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    hist_lengths: jax.Array | None = None,  # [B] M-FALCON: keys >= this are candidates
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    k_timestamps: jax.Array | None = None,  # [B, C]
    q_timestamps: jax.Array | None = None,  # [B, M]
    backend: Backend = "auto",
) -> jax.Array:
    """A few new queries against a K/V cache (incremental prefill, decode, M-FALCON scoring).

    Query m of row b sits at cache index ``q_positions[b, m]`` and sees keys j <= that index
    (and j < kv_lengths[b]). With ``hist_lengths`` the keys at or past it are candidates:
    a candidate query sees the history and itself only, and takes position hist_length
    for the relative bias. Equal to ``hstu_attention`` on the full sequence, restricted to
    the new rows (tested).
    """
    if alpha is None:
        alpha = 1.0 / math.sqrt(q.shape[-1])
    c = k_cache.shape[1]
    j = jnp.arange(c)[None, None, :]
    qp = q_positions[:, :, None]
    mask = (j <= qp) & (j < kv_lengths[:, None, None])
    k_pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None, :], (q.shape[0], c))
    q_pos = q_positions.astype(jnp.int32)
    if hist_lengths is not None:
        hist = hist_lengths[:, None, None]
        mask = mask & ((j < hist) | (j == qp))
        k_pos = jnp.minimum(k_pos, hist_lengths[:, None])
        q_pos = jnp.minimum(q_pos, hist_lengths[:, None])
    if resolve_backend(backend) == "triton":
        from genrec_jax.kernels.hstu_attention import hstu_attention_cached_triton
        from genrec_jax.sharding import per_shard

        def call(q, k_cache, v_cache, q_positions, kv_lengths, hist_lengths, pos_bias, time_bias, k_timestamps,
                 q_timestamps):
            return hstu_attention_cached_triton(
                q, k_cache, v_cache, q_positions, kv_lengths, alpha=alpha, max_len=max_len, norm=norm,
                hist_lengths=hist_lengths, pos_bias=pos_bias, time_bias=time_bias,
                k_timestamps=k_timestamps, q_timestamps=q_timestamps,
            )

        rows, seqs, heads = ("batch",), ("batch", None), ("batch", None, "heads", None)
        return per_shard(
            call,
            dict(q=q, k_cache=k_cache, v_cache=v_cache, q_positions=q_positions, kv_lengths=kv_lengths,
                 hist_lengths=hist_lengths, pos_bias=pos_bias, time_bias=time_bias, k_timestamps=k_timestamps,
                 q_timestamps=q_timestamps),
            dict(q=heads, k_cache=heads, v_cache=heads, q_positions=seqs, kv_lengths=rows, hist_lengths=rows,
                 pos_bias=(None,), time_bias=(None,), k_timestamps=seqs, q_timestamps=seqs),
            heads,
        )
    bias = relative_bias(q_pos, k_pos, pos_bias, q_timestamps, k_timestamps, time_bias)
    return hstu_attention_dense(q, k_cache, v_cache, mask, bias, alpha=alpha, norm=norm, max_len=max_len)

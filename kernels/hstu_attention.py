"""Triton kernels for HSTU pointwise attention, with jax-triton wrappers and a custom VJP.

For one sequence of length L (heads independent, i = query row, j = key row):

    s_ij   = alpha * <q_i, k_j> + rab_ij
    rab_ij = pos_bias[clip(p_i - p_j, 0, P-1)] + time_bias[bucket(t'_i - t_j)]
    a_ij   = SiLU(s_ij) / n_i            if visible(i, j) else 0
    out_i  = sum_j a_ij v_j

* visible(i, j): j <= i < L; with M-FALCON targets (hist = L - num_targets) a candidate row
  i >= hist sees j < hist and j == i only. p_i = min(i, hist) (i without targets).
* bucket(dt) = min(floor(2 * log2(1 + max(dt, 0))), NB - 1), computed exactly from the
  float32 bit pattern of 1 + dt (see ``_time_bucket``); t' are query timestamps.
* n_i = max_len ("max_len") or the number of visible keys = p_i + 1 ("causal_count").

Backward (dO_i given; sigma = sigmoid(s)):

    dV_j  = sum_i a_ij dO_i
    dS_ij = (dO_i . v_j) / n_i * sigma_ij * (1 + s_ij * (1 - sigma_ij))   (visible pairs)
    dQ_i  = alpha * sum_j dS_ij k_j          dK_j = alpha * sum_i dS_ij q_i
    dpos_bias[r] = sum over (b, h, i, j) with clip(p_i - p_j) = r of dS_ij
    dtime_bias[t] = sum over (b, h, i, j) with bucket_ij = t of dS_ij

Layout: values are token-major ``[T, H, D]``; sequence b occupies rows
``[starts[b], starts[b] + lens[b])``. Padded ``[B, N, H, D]`` input is the same buffer with
``starts[b] = b * N`` (no copy); then the kernels also write zeros to the padding rows, so
every output element is defined. Programs whose query (or key) block lies past a
sequence's length do no arithmetic. Design notes and FLOP/byte counts: ``kernels/NOTES.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from genrec_jax.kernels import launch
from genrec_jax.ops.hstu_attention import (  # noqa: F401 -- the limits are part of this module's interface
    STORED_DS_AUTO_MAX_BYTES, STORED_DS_MIN_LEN, auto_stores_ds, stored_ds_elements)

# --------------------------------------------------------------------------- shared device code


@triton.jit
def _time_bucket(dt, num_buckets):
    """bucket = min(floor(2 * log2(1 + max(dt, 0))), num_buckets - 1) without a logarithm.

    With x = float32(1 + dt) = 2^e * (1 + m / 2^23): floor(2 log2 x) = 2e + [x >= sqrt(2) 2^e],
    and since x is an integer (exact below 2^24) the half-octave test is m >= 0x3504F4
    ((sqrt(2) - 1) * 2^23 = 3474675.7...). Exact for dt < 2^24 s; above, it follows the
    float32 rounding of 1 + dt, like the XLA reference.
    """
    x = tl.maximum(dt, 0).to(tl.float32) + 1.0
    bits = x.to(tl.int32, bitcast=True)
    octave = (bits >> 23) - 127
    half = ((bits & 0x7FFFFF) >= 0x3504F4).to(tl.int32)
    return tl.minimum(2 * octave + half, num_buckets - 1)


@triton.jit
def _tanh(x, SILU: tl.constexpr):
    """tanh: one MUFU instruction (``tanh.approx.f32``, relative error <= 2^-10.7) when
    SILU == 2; otherwise the same algebra through exp (what the CPU interpreter runs)."""
    if SILU == 2:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = 1.0 - tl.fdiv(2.0, 1.0 + tl.exp(2.0 * x))
    return t


@triton.jit
def _sigmoid(s, SILU: tl.constexpr):
    """SILU == 0 (fp32 inputs): 1 / (1 + exp(-s)) -- two MUFU ops (ex2, rcp).
    SILU >= 1 (16-bit inputs): 0.5 + 0.5 tanh(s / 2) -- one MUFU op on the GPU."""
    if SILU == 0:
        sig = tl.fdiv(1.0, 1.0 + tl.exp(-s))
    else:
        sig = 0.5 + 0.5 * _tanh(0.5 * s, SILU)
    return sig


@triton.jit
def _silu_pre(x, SILU: tl.constexpr):
    """SiLU(s) from x = s (SILU == 0) or x = s / 2 (SILU >= 1, the forward folds the 1/2 into
    alpha and the bias adds, so the tanh form costs one MUFU op and one FMA per element)."""
    if SILU == 0:
        a = tl.fdiv(x, 1.0 + tl.exp(-x))
    else:
        a = x + x * _tanh(x, SILU)
    return a


@triton.jit
def _silu(s, SILU: tl.constexpr):
    """s * sigmoid(s) (see :func:`_silu_pre`, which takes s / 2 when SILU >= 1)."""
    if SILU == 0:
        a = _silu_pre(s, SILU)
    else:
        a = _silu_pre(0.5 * s, SILU)
    return a


@triton.jit
def _table(TABLE, idx, NC: tl.constexpr):
    """TABLE[idx] for a tile of indices into a small f32 table (the relative-bias tables).

    NC == 1 (GPU): one ``ld.global.nc.f32`` per element in inline PTX. A plain ``tl.load``
    inside a key loop is software-pipelined by Triton, which turns the gather into one 4-byte
    ``cp.async`` per element through shared memory: on an H100 that made the forward with the
    time bias 3x slower than the same kernel with the bias computed arithmetically
    (kernels/NOTES.md). The opaque load keeps the gather a read-only-cache hit. NC == 0: the
    plain load (the CPU interpreter cannot run PTX).
    """
    if NC == 1:
        base = TABLE.to(tl.int64)
        val = tl.inline_asm_elementwise(
            "{ .reg .u64 t; mul.wide.s32 t, $2, 4; add.u64 t, t, $1; ld.global.nc.f32 $0, [t]; }",
            "=f,l,r", [base + tl.zeros_like(idx).to(tl.int64), idx], dtype=tl.float32, is_pure=True, pack=1)
    else:
        val = tl.load(TABLE + idx)
    return val


@triton.jit
def _block_of_program(GROUPED: tl.constexpr):
    """(sequence * H + head, block index) of this program, for a grid (B * H, blocks).

    The hardware starts programs in launch order, axis 0 fastest: one block (the heaviest
    first) of every (sequence, head), then the next. With GROUPED the launch index is re-read
    block-fastest instead, so consecutive programs are the blocks of one (sequence, head):
    they read the same K/V (or Q/dO) rows, which then come from L2 rather than memory. That
    wins on long sequences, whose rows do not stay in L2 otherwise (N=4096: forward 0.90
    against 0.96 ms); on short ones the plain order, which balances the load better, is
    faster (training shape: 0.153 against 0.181 ms). ``GROUP_MIN_LEN`` picks (NOTES.md).
    """
    if GROUPED:
        nbh = tl.num_programs(0)
        nblk = tl.num_programs(1)
        lin = tl.program_id(1) * nbh + tl.program_id(0)
        bh = lin // nblk
        blk = lin % nblk
    else:
        bh = tl.program_id(0)
        blk = tl.program_id(1)
    return bh, blk


@triton.jit
def _load_rows(PTR, rows, offs_d, ROW_STRIDE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """PTR[rows, :D] as a [len(rows), BLOCK_D] tile, rows all valid (no row mask); the
    head-dim mask only when BLOCK_D pads D."""
    ptrs = PTR + rows[:, None] * ROW_STRIDE + offs_d[None, :]
    if D == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _fwd_range(
    acc, q, offs_m, pos_m, qts_m,  # [BM, BDV] f32, [BM, BDQK], [BM], [BM], [BM]
    lo, hi, hist,
    K, V, TS, POS_BIAS, TIME_BIAS,  # K/V/TS already offset to (sequence start, head)
    alpha, num_pos, num_buckets,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # 0: all pairs visible; 1: keys j < hi only; 2: full causal/target mask
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
    SILU: tl.constexpr,  # 0: exact sigmoid (fp32 inputs); 1/2: through tanh (see _silu)
    NC: tl.constexpr,  # table loads: 1 inline-PTX ld.global.nc (GPU), 0 tl.load (see _table)
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """acc += sum over key blocks in [lo, hi) of SiLU(alpha q k^T + rab) (masked) @ v."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    if SILU == 0:
        scale = alpha
        bias_scale = 1.0
    else:
        scale = 0.5 * alpha
        bias_scale = 0.5
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN] key rows
        if MASK == 0:
            k = _load_rows(K, offs_n, offs_dqk, H * DQK, DQK, BLOCK_DQK)  # [BN, BDQK]
            v = _load_rows(V, offs_n, offs_dv, H * DV, DV, BLOCK_DV)  # [BN, BDV]
        else:
            k = tl.load(K + offs_n[:, None] * (H * DQK) + offs_dqk[None, :],
                        mask=(offs_n < hi)[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
            v = tl.load(V + offs_n[:, None] * (H * DV) + offs_dv[None, :],
                        mask=(offs_n < hi)[:, None] & (offs_dv[None, :] < DV), other=0.0)
        # x = s, or s / 2 for the tanh form (see _silu_pre): scale and bias_scale fold the 1/2 in
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN] f32
        if HAS_POS:
            if HAS_TARGETS:
                pos_n = tl.minimum(offs_n, hist)
            else:
                pos_n = offs_n
            rel = tl.minimum(tl.maximum(pos_m[:, None] - pos_n[None, :], 0), num_pos - 1)
            x += bias_scale * _table(POS_BIAS, rel, NC)
        if HAS_TIME:
            if MASK == 0:
                ts_n = tl.load(TS + offs_n)
            else:
                ts_n = tl.load(TS + offs_n, mask=offs_n < hi, other=0)
            x += bias_scale * _table(TIME_BIAS, _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets), NC)
        a = _silu_pre(x, SILU)  # [BM, BN]
        if MASK == 1:
            a = tl.where((offs_n < hi)[None, :], a, 0.0)
        if MASK == 2:
            vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < hi)[None, :]
            if HAS_TARGETS:
                vis = vis & ((offs_n < hist)[None, :] | (offs_n[None, :] == offs_m[:, None]))
            a = tl.where(vis, a, 0.0)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)  # [BM, BDV]
    return acc


@triton.jit
def _fwd_range_early(
    acc, q, lo, hi, K, V, alpha,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``_fwd_range`` for key blocks whose pairs are all visible (MASK == 0) and no relative
    bias, pipelined by hand: the next block's scores QK^T are issued before this block's SiLU
    and AV product, so the loop carries S. Same result as ``_fwd_range`` (tested); which of
    the two is faster depends on the tile (``EARLY_S`` in the forward configurations)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_b = tl.arange(0, BLOCK_N)
    if SILU == 0:
        scale = alpha
    else:
        scale = 0.5 * alpha
    if lo < hi:
        k = _load_rows(K, lo + offs_b, offs_dqk, H * DQK, DQK, BLOCK_DQK)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN] f32
        for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
            v = _load_rows(V, start_n - BLOCK_N + offs_b, offs_dv, H * DV, DV, BLOCK_DV)
            k = _load_rows(K, start_n + offs_b, offs_dqk, H * DQK, DQK, BLOCK_DQK)
            x_next = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            a = _silu_pre(x, SILU)
            acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
            x = x_next
        v = _load_rows(V, hi - BLOCK_N + offs_b, offs_dv, H * DV, DV, BLOCK_DV)
        a = _silu_pre(x, SILU)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc


# --------------------------------------------------------------------------- forward


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V,  # [T, H, DQK], [T, H, DQK], [T, H, DV]
    SEQ_STARTS, SEQ_LENS, NUM_TARGETS,  # [B] int32
    POS_BIAS, TIME_BIAS,  # [P] f32, [NB] f32
    TS, QTS,  # [T] int: key timestamps, query (prediction) timestamps
    alpha, inv_max_len,  # f32
    num_pos, num_buckets, pad_rows,  # i32: P, NB, rows per sequence slot when PADDED
    OUT,  # [T, H, DV]
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PADDED: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    EARLY_S: tl.constexpr,  # 1: the unmasked key range without a bias runs _fwd_range_early
    GROUPED: tl.constexpr,  # launch order (see _block_of_program)
):
    """One program = one (sequence, head, query block); grid (B * H, cdiv(max_len, BLOCK_M)).

    Query blocks are visited last-first (the causally heaviest start first). Key blocks:
    [0, min(start_m, hist)) unmasked (every such pair is visible), one partially masked block
    if that bound is not block aligned, then the diagonal blocks [start_m, start_m + BLOCK_M)
    with the full mask. Key blocks between hist and start_m (other candidates) are skipped.
    """
    pid_bh, blk = _block_of_program(GROUPED)
    b = pid_bh // H
    h = pid_bh % H
    start_m = (tl.num_programs(1) - 1 - blk) * BLOCK_M
    seq_start = tl.load(SEQ_STARTS + b).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + b)
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM] query rows within the sequence
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    out_ptrs = OUT + (seq_start * H + h) * DV + offs_m[:, None] * (H * DV) + offs_dv[None, :]
    if PADDED:
        store_mask = (offs_m < pad_rows)[:, None] & (offs_dv[None, :] < DV)
    else:
        store_mask = (offs_m < seq_len)[:, None] & (offs_dv[None, :] < DV)
    if start_m < seq_len:
        if HAS_TARGETS:
            hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b), 0), seq_len)
            pos_m = tl.minimum(offs_m, hist)
        else:
            hist = seq_len
            pos_m = offs_m
        q_ptrs = Q + (seq_start * H + h) * DQK + offs_m[:, None] * (H * DQK) + offs_dqk[None, :]
        q = tl.load(q_ptrs, mask=(offs_m < seq_len)[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
        if HAS_TIME:
            qts_m = tl.load(QTS + seq_start + offs_m, mask=offs_m < seq_len, other=0)  # [BM]
        else:
            qts_m = offs_m
        K_seq = K + (seq_start * H + h) * DQK
        V_seq = V + (seq_start * H + h) * DV
        TS_seq = TS + seq_start
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        a_end = tl.minimum(start_m, hist)
        a_full = (a_end // BLOCK_N) * BLOCK_N
        if EARLY_S and not (HAS_POS or HAS_TIME):
            acc = _fwd_range_early(acc, q, 0, a_full, K_seq, V_seq, alpha, H, DQK, DV, PRECISION, SILU, BLOCK_N,
                                   BLOCK_DQK, BLOCK_DV)
        else:
            acc = _fwd_range(acc, q, offs_m, pos_m, qts_m, 0, a_full, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                             TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 0, HAS_TARGETS, HAS_POS, HAS_TIME,
                             PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        acc = _fwd_range(acc, q, offs_m, pos_m, qts_m, a_full, a_end, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                         TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 1, HAS_TARGETS, HAS_POS, HAS_TIME,
                         PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        acc = _fwd_range(acc, q, offs_m, pos_m, qts_m, start_m, tl.minimum(start_m + BLOCK_M, seq_len), hist,
                         K_seq, V_seq, TS_seq, POS_BIAS, TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 2,
                         HAS_TARGETS, HAS_POS, HAS_TIME, PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        if NORM_COUNT:
            acc = acc / (pos_m + 1).to(tl.float32)[:, None]  # visible keys = p_i + 1
        else:
            acc = acc * inv_max_len
        acc = tl.where((offs_m < seq_len)[:, None], acc, 0.0)
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=store_mask)
    else:
        if PADDED:
            tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_DV], dtype=OUT.dtype.element_ty), mask=store_mask)


# --------------------------------------------------------------------------- backward


@triton.jit
def _ds_slab(DS, pid_bh, kb, ds_tiles, SLAB: tl.constexpr):
    """(pointer to the first element, row stride) of key block ``kb``'s slab in the stored dS^T.

    ``dq_mode="stored"`` keeps, per (sequence, head), one slab per key block of SLAB keys:
    rows = its keys, columns = the queries from the block's first key to the end of the
    padded length (``ds_tiles * SLAB``), so slab kb is SLAB x (ds_tiles - kb) * SLAB and the
    (sequence, head) region holds SLAB^2 * ds_tiles * (ds_tiles + 1) / 2 values
    (``stored_ds_elements``): the causal half of the square and its diagonal blocks. Only the
    (key block, query block) tiles the backward visits are written.
    """
    t = ds_tiles.to(tl.int64)
    k64 = kb.to(tl.int64)
    region = pid_bh.to(tl.int64) * (SLAB * SLAB * (t * (t + 1) // 2))
    slab = region + SLAB * SLAB * (k64 * t - k64 * (k64 - 1) // 2)
    return DS + slab, (t - k64) * SLAB


@triton.jit
def _bwd_range(
    dk, dv, dtime, k, v, offs_n, pos_n, ts_n,  # [BN, BDQK] f32, [BN, BDV] f32, [BNB] f32, [BN, *], [BN]
    start_n, lo, hi, seq_len, hist,
    Q, DO, QTS, DQ, POS_BIAS, TIME_BIAS, DPOS,  # Q/DO/QTS/DQ offset to (sequence start, head)
    DS, ds_row,  # STORE_DS: this key block's slab of the stored dS^T (see _ds_slab) and its row stride
    alpha, inv_max_len, num_pos, num_buckets,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # 0: every pair visible (off-diagonal, keys < hist); 1: full mask
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, STORE_DS: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    """Accumulate dK, dV (and the time-bias histogram) of one key block over the query
    blocks in [lo, hi); dQ and the position-bias gradient are added atomically per tile.

    Tiles are kept transposed, keys x queries ([BN, BM]), so dV += A^T dO and dK += dS^T Q
    need no register transposes.
    """
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_NB)
    w_idx = tl.arange(0, BLOCK_N)[:, None]  # [BN, 1] diagonal offset (pos-bias reduction)
    a_idx = tl.arange(0, BLOCK_M)[None, :]  # [1, BM] query column within the tile
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM] query rows
        row_ok = offs_m < seq_len
        q = tl.load(Q + offs_m[:, None] * (H * DQK) + offs_dqk[None, :],
                    mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
        do = tl.load(DO + offs_m[:, None] * (H * DV) + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BM, BDV]
        if HAS_TARGETS:
            pos_m = tl.minimum(offs_m, hist)
        else:
            pos_m = offs_m
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * alpha  # [BN, BM] f32
        if HAS_POS:
            st += _table(POS_BIAS, tl.minimum(tl.maximum(pos_m[None, :] - pos_n[:, None], 0), num_pos - 1), NC)
        if HAS_TIME:
            qts_m = tl.load(QTS + offs_m, mask=row_ok, other=0)
            bkt = _time_bucket(qts_m[None, :] - ts_n[:, None], num_buckets)  # [BN, BM] int32
            st += _table(TIME_BIAS, bkt, NC)
        sig = _sigmoid(st, SILU)
        if NORM_COUNT:
            inv_n = 1.0 / (pos_m + 1).to(tl.float32)  # [BM]
        else:
            inv_n = tl.zeros([BLOCK_M], dtype=tl.float32) + inv_max_len
        at = st * sig * inv_n[None, :]  # [BN, BM] = A^T
        if MASK == 1:
            vis = (offs_n[:, None] <= offs_m[None, :]) & (offs_n < seq_len)[:, None] & row_ok[None, :]
            if HAS_TARGETS:
                vis = vis & ((offs_n < hist)[:, None] | (offs_n[:, None] == offs_m[None, :]))
            at = tl.where(vis, at, 0.0)
        dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PRECISION)  # [BN, BDV]
        dat = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM] = dA^T
        dst = dat * inv_n[None, :] * sig * (1.0 + st * (1.0 - sig))  # [BN, BM] = dS^T
        if MASK == 1:
            dst = tl.where(vis, dst, 0.0)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)  # [BN, BDQK]
        if STORE_DS:
            # dS^T as the dK product reads it; columns are queries relative to the slab's first
            tl.store(DS + tl.arange(0, BLOCK_N)[:, None] * ds_row + (offs_m - start_n)[None, :],
                     dst.to(DS.dtype.element_ty))
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION) * alpha  # [BM, BDQK]
            tl.atomic_add(DQ + offs_m[:, None] * (H * DQK) + offs_dqk[None, :], dq,
                          mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), sem="relaxed")
        if HAS_POS:
            # History rows (i < hist): p_i - p_j = i - j = (start_m - start_n) + (a - c). Sum dS
            # along the tile's diagonals: U[w, a] = dS^T[(a - w) mod BN, a] puts the pairs with
            # a - c = w (a >= w) or a - c = w - BN (a < w) in row w.
            if HAS_TARGETS:
                xt = tl.where((offs_m < hist)[None, :], dst, 0.0)
            else:
                xt = dst
            u = tl.gather(xt, (a_idx - w_idx + BLOCK_N) % BLOCK_N, 0)  # [BN, BM]
            g_hi = tl.sum(tl.where(a_idx >= w_idx, u, 0.0), axis=1)  # [BN] rel = base + w
            g_lo = tl.sum(tl.where(a_idx < w_idx, u, 0.0), axis=1)  # [BN] rel = base + w - BN
            rel_hi = (start_m - start_n) + tl.arange(0, BLOCK_N)
            rel_lo = rel_hi - BLOCK_N
            tl.atomic_add(DPOS + tl.minimum(tl.maximum(rel_hi, 0), num_pos - 1), g_hi, mask=rel_hi >= 0,
                          sem="relaxed")
            tl.atomic_add(DPOS + tl.minimum(tl.maximum(rel_lo, 0), num_pos - 1), g_lo, mask=rel_lo >= 0,
                          sem="relaxed")
            if HAS_TARGETS:
                if start_m + BLOCK_M > hist:
                    # Candidate rows: p_i = hist, so the relative position depends on j only.
                    col = tl.sum(tl.where((offs_m >= hist)[None, :], dst, 0.0), axis=1)  # [BN]
                    rel_t = tl.minimum(tl.maximum(hist - pos_n, 0), num_pos - 1)
                    tl.atomic_add(DPOS + rel_t, col, sem="relaxed")
        if HAS_TIME:
            # Weighted histogram over the buckets present in this tile (usually a handful).
            if MASK == 1:
                valid = vis
            else:
                valid = (offs_n < seq_len)[:, None] & row_ok[None, :]
            t_lo = tl.min(tl.where(valid, bkt, num_buckets))
            t_hi = tl.max(tl.where(valid, bkt, -1))
            for t in range(t_lo, t_hi + 1):
                tot = tl.sum(tl.where(bkt == t, dst, 0.0))
                dtime += tl.where(offs_nb == t, tot, 0.0)
    return dk, dv, dtime


@triton.jit
def _hstu_bwd_kernel(
    Q, K, V, DO,  # [T, H, DQK] x2, [T, H, DV] x2
    SEQ_STARTS, SEQ_LENS, NUM_TARGETS,  # [B] int32
    POS_BIAS, TIME_BIAS,  # [P], [NB] f32
    TS, QTS,  # [T] int
    alpha, inv_max_len,
    num_pos, num_buckets, pad_rows, ds_tiles,
    DQ,  # [T, H, DQK] f32, zero-initialised (atomic adds)
    DK, DV,  # [T, H, DQK], [T, H, DV]
    DPOS, DTIME,  # [P], [NB] f32, zero-initialised
    DS,  # STORE_DS: [stored_ds_elements(B, H, max_len, BLOCK_N)] dS^T slabs for _hstu_bwd_dq_stored_kernel
    H: tl.constexpr, DQK: tl.constexpr, DV_DIM: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PADDED: tl.constexpr, ATOMIC_DQ: tl.constexpr, STORE_DS: tl.constexpr, PRECISION: tl.constexpr,
    SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr, GROUPED: tl.constexpr,
):
    """One program = one (sequence, head, key block); grid (B * H, cdiv(max_len, BLOCK_N)).
    With ATOMIC_DQ the same tiles also add alpha dS K into the f32 DQ buffer; with STORE_DS
    they write dS^T (in the inputs' dtype) for ``_hstu_bwd_dq_stored_kernel``; with neither,
    DQ is unused and ``_hstu_bwd_dq_kernel`` computes dQ.

    Query blocks visited: the diagonal ones [start_n, start_n + BLOCK_N) with the full mask,
    then (only if the key block holds history keys) every later one up to the length, without
    element masks when all its keys are history keys. Requires BLOCK_N % BLOCK_M == 0.
    """
    pid_bh, blk = _block_of_program(GROUPED)
    b = pid_bh // H
    h = pid_bh % H
    start_n = blk * BLOCK_N
    seq_start = tl.load(SEQ_STARTS + b).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + b)
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN] key rows
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ptrs = DK + (seq_start * H + h) * DQK + offs_n[:, None] * (H * DQK) + offs_dqk[None, :]
    dv_ptrs = DV + (seq_start * H + h) * DV_DIM + offs_n[:, None] * (H * DV_DIM) + offs_dv[None, :]
    if PADDED:
        row_store = offs_n < pad_rows
    else:
        row_store = offs_n < seq_len
    if start_n < seq_len:
        if HAS_TARGETS:
            hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b), 0), seq_len)
            pos_n = tl.minimum(offs_n, hist)
        else:
            hist = seq_len
            pos_n = offs_n
        key_ok = offs_n < seq_len
        k = tl.load(K + (seq_start * H + h) * DQK + offs_n[:, None] * (H * DQK) + offs_dqk[None, :],
                    mask=key_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BN, BDQK]
        v = tl.load(V + (seq_start * H + h) * DV_DIM + offs_n[:, None] * (H * DV_DIM) + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < DV_DIM), other=0.0)  # [BN, BDV]
        if HAS_TIME:
            ts_n = tl.load(TS + seq_start + offs_n, mask=key_ok, other=0)
        else:
            ts_n = offs_n
        Q_seq = Q + (seq_start * H + h) * DQK
        DO_seq = DO + (seq_start * H + h) * DV_DIM
        DQ_seq = DQ + (seq_start * H + h) * DQK
        QTS_seq = QTS + seq_start
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        dtime = tl.zeros([BLOCK_NB], dtype=tl.float32)
        if STORE_DS:
            DS_slab, ds_row = _ds_slab(DS, pid_bh, blk, ds_tiles, BLOCK_N)
        else:
            DS_slab = DS
            ds_row = 0
        # diagonal query blocks (full mask), then the later ones (keys < hist only)
        dk, dv, dtime = _bwd_range(
            dk, dv, dtime, k, v, offs_n, pos_n, ts_n, start_n, start_n, tl.minimum(start_n + BLOCK_N, seq_len),
            seq_len, hist, Q_seq, DO_seq, QTS_seq, DQ_seq, POS_BIAS, TIME_BIAS, DPOS, DS_slab, ds_row, alpha,
            inv_max_len, num_pos, num_buckets, H, DQK, DV_DIM, 1, NORM_COUNT, HAS_TARGETS, HAS_POS, HAS_TIME,
            ATOMIC_DQ, STORE_DS, PRECISION, SILU, NC, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV, BLOCK_NB)
        if start_n < hist:
            if start_n + BLOCK_N <= hist:  # all keys are history keys: no element masks
                dk, dv, dtime = _bwd_range(
                    dk, dv, dtime, k, v, offs_n, pos_n, ts_n, start_n, start_n + BLOCK_N, seq_len, seq_len, hist,
                    Q_seq, DO_seq, QTS_seq, DQ_seq, POS_BIAS, TIME_BIAS, DPOS, DS_slab, ds_row, alpha,
                    inv_max_len, num_pos, num_buckets, H, DQK, DV_DIM, 0, NORM_COUNT, HAS_TARGETS, HAS_POS,
                    HAS_TIME, ATOMIC_DQ, STORE_DS, PRECISION, SILU, NC, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV, BLOCK_NB)
            else:
                dk, dv, dtime = _bwd_range(
                    dk, dv, dtime, k, v, offs_n, pos_n, ts_n, start_n, start_n + BLOCK_N, seq_len, seq_len, hist,
                    Q_seq, DO_seq, QTS_seq, DQ_seq, POS_BIAS, TIME_BIAS, DPOS, DS_slab, ds_row, alpha,
                    inv_max_len, num_pos, num_buckets, H, DQK, DV_DIM, 1, NORM_COUNT, HAS_TARGETS, HAS_POS,
                    HAS_TIME, ATOMIC_DQ, STORE_DS, PRECISION, SILU, NC, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV, BLOCK_NB)
        dk = tl.where(key_ok[:, None], dk * alpha, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_store[:, None] & (offs_dqk[None, :] < DQK))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_store[:, None] & (offs_dv[None, :] < DV_DIM))
        if HAS_TIME:
            offs_nb = tl.arange(0, BLOCK_NB)
            tl.atomic_add(DTIME + offs_nb, dtime, mask=offs_nb < num_buckets, sem="relaxed")
    else:
        if PADDED:
            tl.store(dk_ptrs, tl.zeros([BLOCK_N, BLOCK_DQK], dtype=DK.dtype.element_ty),
                     mask=row_store[:, None] & (offs_dqk[None, :] < DQK))
            tl.store(dv_ptrs, tl.zeros([BLOCK_N, BLOCK_DV], dtype=DV.dtype.element_ty),
                     mask=row_store[:, None] & (offs_dv[None, :] < DV_DIM))


@triton.jit
def _dq_range(
    dq, q, do, offs_m, pos_m, qts_m, inv_n,  # [BM, BDQK] f32, [BM, BDQK], [BM, BDV], [BM] x4
    lo, hi, hist,
    K, V, TS, POS_BIAS, TIME_BIAS,  # offset to (sequence start, head)
    alpha, num_pos, num_buckets,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # as in _fwd_range
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
    SILU: tl.constexpr,  # 0: exact sigmoid (fp32 inputs); 1/2: through tanh (see _silu)
    NC: tl.constexpr,  # table loads: 1 inline-PTX ld.global.nc (GPU), 0 tl.load (see _table)
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq += sum over key blocks in [lo, hi) of dS k, recomputing S and dA = dO v^T."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * (H * DQK) + offs_dqk[None, :]
        v_ptrs = V + offs_n[:, None] * (H * DV) + offs_dv[None, :]
        if MASK == 0:
            k = tl.load(k_ptrs, mask=offs_dqk[None, :] < DQK, other=0.0)  # [BN, BDQK]
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)  # [BN, BDV]
        else:
            k = tl.load(k_ptrs, mask=(offs_n < hi)[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n < hi)[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha  # [BM, BN]
        if HAS_POS:
            if HAS_TARGETS:
                pos_n = tl.minimum(offs_n, hist)
            else:
                pos_n = offs_n
            s += _table(POS_BIAS, tl.minimum(tl.maximum(pos_m[:, None] - pos_n[None, :], 0), num_pos - 1), NC)
        if HAS_TIME:
            if MASK == 0:
                ts_n = tl.load(TS + offs_n)
            else:
                ts_n = tl.load(TS + offs_n, mask=offs_n < hi, other=0)
            s += _table(TIME_BIAS, _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets), NC)
        sig = _sigmoid(s, SILU)
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BM, BN] = dA
        ds = da * inv_n[:, None] * sig * (1.0 + s * (1.0 - sig))  # [BM, BN] = dS
        if MASK == 1:
            ds = tl.where((offs_n < hi)[None, :], ds, 0.0)
        if MASK == 2:
            vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n < hi)[None, :]
            if HAS_TARGETS:
                vis = vis & ((offs_n < hist)[None, :] | (offs_n[None, :] == offs_m[:, None]))
            ds = tl.where(vis, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # [BM, BDQK]
    return dq


@triton.jit
def _dq_program(SEQ_STARTS, SEQ_LENS, DQ, pad_rows, H: tl.constexpr, DQK: tl.constexpr, PADDED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_DQK: tl.constexpr, GROUPED: tl.constexpr):
    """What both query-major dQ kernels start from: this program's (sequence, head), query
    block (heaviest first), its rows' dQ pointers and store mask (padding rows in padded mode)."""
    pid_bh, blk = _block_of_program(GROUPED)
    b = pid_bh // H
    h = pid_bh % H
    start_m = (tl.num_programs(1) - 1 - blk) * BLOCK_M
    seq_start = tl.load(SEQ_STARTS + b).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + b)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    dq_ptrs = DQ + (seq_start * H + h) * DQK + offs_m[:, None] * (H * DQK) + offs_dqk[None, :]
    if PADDED:
        store_mask = (offs_m < pad_rows)[:, None] & (offs_dqk[None, :] < DQK)
    else:
        store_mask = (offs_m < seq_len)[:, None] & (offs_dqk[None, :] < DQK)
    return pid_bh, b, h, start_m, seq_start, seq_len, offs_m, offs_dqk, dq_ptrs, store_mask


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO,  # [T, H, DQK] x2, [T, H, DV] x2
    SEQ_STARTS, SEQ_LENS, NUM_TARGETS,  # [B] int32
    POS_BIAS, TIME_BIAS, TS, QTS,
    alpha, inv_max_len,
    num_pos, num_buckets, pad_rows,
    DQ,  # [T, H, DQK]
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PADDED: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """dQ_i = alpha sum_j dS_ij k_j without atomics (``dq_mode="separate"``): the forward's
    grid, key ranges and masks with dS in place of A. Deterministic; recomputes S, the bias
    and dA = dO V^T (4 D flop per pair more than the atomic variant, no f32 L2 reductions)."""
    pid_bh, b, h, start_m, seq_start, seq_len, offs_m, offs_dqk, dq_ptrs, store_mask = _dq_program(
        SEQ_STARTS, SEQ_LENS, DQ, pad_rows, H, DQK, PADDED, BLOCK_M, BLOCK_DQK, GROUPED)
    offs_dv = tl.arange(0, BLOCK_DV)
    if start_m < seq_len:
        if HAS_TARGETS:
            hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b), 0), seq_len)
            pos_m = tl.minimum(offs_m, hist)
        else:
            hist = seq_len
            pos_m = offs_m
        row_ok = offs_m < seq_len
        q = tl.load(Q + (seq_start * H + h) * DQK + offs_m[:, None] * (H * DQK) + offs_dqk[None, :],
                    mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
        do = tl.load(DO + (seq_start * H + h) * DV + offs_m[:, None] * (H * DV) + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BM, BDV]
        if HAS_TIME:
            qts_m = tl.load(QTS + seq_start + offs_m, mask=row_ok, other=0)
        else:
            qts_m = offs_m
        if NORM_COUNT:
            inv_n = 1.0 / (pos_m + 1).to(tl.float32)
        else:
            inv_n = tl.zeros([BLOCK_M], dtype=tl.float32) + inv_max_len
        K_seq = K + (seq_start * H + h) * DQK
        V_seq = V + (seq_start * H + h) * DV
        TS_seq = TS + seq_start
        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        a_end = tl.minimum(start_m, hist)
        a_full = (a_end // BLOCK_N) * BLOCK_N
        dq = _dq_range(dq, q, do, offs_m, pos_m, qts_m, inv_n, 0, a_full, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 0, HAS_TARGETS, HAS_POS, HAS_TIME,
                       PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        dq = _dq_range(dq, q, do, offs_m, pos_m, qts_m, inv_n, a_full, a_end, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 1, HAS_TARGETS, HAS_POS, HAS_TIME,
                       PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        dq = _dq_range(dq, q, do, offs_m, pos_m, qts_m, inv_n, start_m, tl.minimum(start_m + BLOCK_M, seq_len),
                       hist, K_seq, V_seq, TS_seq, POS_BIAS, TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 2,
                       HAS_TARGETS, HAS_POS, HAS_TIME, PRECISION, SILU, NC, BLOCK_N, BLOCK_DQK, BLOCK_DV)
        dq = tl.where(row_ok[:, None], dq * alpha, 0.0)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=store_mask)
    else:
        if PADDED:
            tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_DQK], dtype=DQ.dtype.element_ty), mask=store_mask)


@triton.jit
def _hstu_bwd_dq_stored_kernel(
    DS, K,  # dS^T slabs (see _ds_slab), [T, H, DQK]
    SEQ_STARTS, SEQ_LENS, NUM_TARGETS,  # [B] int32
    alpha, pad_rows, ds_tiles,
    DQ,  # [T, H, DQK]
    H: tl.constexpr, DQK: tl.constexpr, HAS_TARGETS: tl.constexpr, PADDED: tl.constexpr,
    PRECISION: tl.constexpr, SLAB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, GROUPED: tl.constexpr,
):
    """dQ_i = alpha sum_j dS_ij k_j from the dS the key-major backward stored
    (``dq_mode="stored"``): one product per tile, no recomputation of S, the biases or dA.
    Grid (B * H, cdiv(max_len, BLOCK_M)); BLOCK_M and BLOCK_N divide SLAB. Per query block:
    the key blocks before its diagonal block that hold history keys (all of them without
    targets), then the diagonal block's keys up to the block's last query. Those are exactly
    the tiles the backward wrote; entries it masked are zeros there.
    """
    pid_bh, b, h, start_m, seq_start, seq_len, offs_m, offs_dqk, dq_ptrs, store_mask = _dq_program(
        SEQ_STARTS, SEQ_LENS, DQ, pad_rows, H, DQK, PADDED, BLOCK_M, BLOCK_DQK, GROUPED)
    offs_i = tl.arange(0, BLOCK_N)
    if start_m < seq_len:
        kb_diag = start_m // SLAB
        if HAS_TARGETS:
            hist = tl.minimum(tl.maximum(seq_len - tl.load(NUM_TARGETS + b), 0), seq_len)
            n_off = tl.minimum(kb_diag, tl.cdiv(hist, SLAB))
        else:
            n_off = kb_diag
        K_seq = K + (seq_start * H + h) * DQK
        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        for j in range(0, n_off * SLAB, BLOCK_N):  # keys before the diagonal block: all < start_m
            kb = j // SLAB
            slab, ds_row = _ds_slab(DS, pid_bh, kb, ds_tiles, SLAB)
            dst = tl.load(slab + (j - kb * SLAB + offs_i)[:, None] * ds_row + (offs_m - kb * SLAB)[None, :])
            k = _load_rows(K_seq, j + offs_i, offs_dqk, H * DQK, DQK, BLOCK_DQK)  # [BN, BDQK]
            dq = tl.dot(tl.trans(dst), k, dq, input_precision=PRECISION)  # [BM, BDQK]
        d0 = kb_diag * SLAB
        slab, ds_row = _ds_slab(DS, pid_bh, kb_diag, ds_tiles, SLAB)
        for j in range(d0, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
            rows = j + offs_i
            dst = tl.load(slab + (rows - d0)[:, None] * ds_row + (offs_m - d0)[None, :])
            k = tl.load(K_seq + rows[:, None] * (H * DQK) + offs_dqk[None, :],
                        mask=(rows < seq_len)[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
            dq = tl.dot(tl.trans(dst), k, dq, input_precision=PRECISION)
        # rows past the length may have read columns the backward never wrote: dropped here
        dq = tl.where((offs_m < seq_len)[:, None], dq * alpha, 0.0)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=store_mask)
    else:
        if PADDED:
            tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_DQK], dtype=DQ.dtype.element_ty), mask=store_mask)


# --------------------------------------------------------------------------- cached (decode)


@triton.jit
def _hstu_cached_kernel(
    Q,  # [B, M, H, DQK] new queries
    K, V,  # [B, C, H, DQK], [B, C, H, DV] cache (history, then the new tokens)
    Q_POS,  # [B, M] int32: cache index of each query
    KV_LENS, HIST_LENS,  # [B] int32
    POS_BIAS, TIME_BIAS,  # [P], [NB] f32
    K_TS, Q_TS,  # [B, C], [B, M] int
    alpha, inv_max_len,
    num_pos, num_buckets, num_queries, cache_len,
    OUT,  # [B, M, H, DV]
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_HIST: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PRECISION: tl.constexpr, SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Query m (cache index qp_m) sees keys j <= qp_m, j < kv_len; with HAS_HIST a query at or
    past hist sees j < hist and itself only, and p = min(index, hist) for the bias.

    Grid (B * H, cdiv(M, BLOCK_M)). Keys [0, min(max qp + 1, kv_len, hist)) go through the
    tiled loop; each candidate's own key (j = qp >= hist) is one row dot product, so M-FALCON
    scoring never loops over the other candidates' keys. n_i counts the visible keys.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    start_m = tl.program_id(1) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_queries
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    qp = tl.load(Q_POS + b64 * num_queries + offs_m, mask=row_ok, other=-1)  # [BM]
    kv_len = tl.load(KV_LENS + b)
    if HAS_HIST:
        hist = tl.maximum(tl.load(HIST_LENS + b), 0)
        q_pos = tl.minimum(qp, hist)
    else:
        hist = kv_len
        q_pos = qp
    q = tl.load(Q + ((b64 * num_queries + offs_m[:, None]) * H + h) * DQK + offs_dqk[None, :],
                mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
    if HAS_TIME:
        qts = tl.load(Q_TS + b64 * num_queries + offs_m, mask=row_ok, other=0)
    else:
        qts = qp
    K_b = K + (b64 * cache_len * H + h) * DQK
    V_b = V + (b64 * cache_len * H + h) * DV
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = tl.minimum(tl.max(qp) + 1, kv_len)
    if HAS_HIST:
        hi = tl.minimum(hi, hist)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k = tl.load(K_b + offs_n[:, None] * (H * DQK) + offs_dqk[None, :],
                    mask=key_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BN, BDQK]
        v = tl.load(V_b + offs_n[:, None] * (H * DV) + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BN, BDV]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha  # [BM, BN]
        if HAS_POS:
            s += _table(POS_BIAS, tl.minimum(tl.maximum(q_pos[:, None] - offs_n[None, :], 0), num_pos - 1), NC)
        if HAS_TIME:
            ts_n = tl.load(K_TS + b64 * cache_len + offs_n, mask=key_ok, other=0)
            s += _table(TIME_BIAS, _time_bucket(qts[:, None] - ts_n[None, :], num_buckets), NC)
        vis = (offs_n[None, :] <= qp[:, None]) & key_ok[None, :]
        a = tl.where(vis, _silu(s, SILU), 0.0)
        count += tl.sum(vis.to(tl.float32), axis=1)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
    if HAS_HIST:
        own = row_ok & (qp >= hist) & (qp < kv_len)  # candidates: their own key
        k_own = tl.load(K_b + qp[:, None] * (H * DQK) + offs_dqk[None, :],
                        mask=own[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
        v_own = tl.load(V_b + qp[:, None] * (H * DV) + offs_dv[None, :],
                        mask=own[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BM, BDV]
        s_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), axis=1) * alpha  # [BM]
        if HAS_POS:
            s_own += tl.load(POS_BIAS)  # p_i - p_j = hist - hist = 0
        if HAS_TIME:
            ts_own = tl.load(K_TS + b64 * cache_len + qp, mask=own, other=0)
            s_own += tl.load(TIME_BIAS + _time_bucket(qts - ts_own, num_buckets))
        a_own = tl.where(own, _silu(s_own, SILU), 0.0)
        a_own = a_own.to(v_own.dtype).to(tl.float32)  # same rounding as the tiled path
        acc += a_own[:, None] * v_own.to(tl.float32)
        count += own.to(tl.float32)
    if NORM_COUNT:
        acc = acc / tl.maximum(count, 1.0)[:, None]
    else:
        acc = acc * inv_max_len
    tl.store(OUT + ((b64 * num_queries + offs_m[:, None]) * H + h) * DV + offs_dv[None, :],
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------- autotuning

# Candidates that fit the H100's 227 KB of shared memory per block, ordered by time on an
# H100 (`python bench/kernels.py --configs wide --verbose`, kernels/NOTES.md): the first of
# each list is the fastest measured at B=32, H=4, D=128, N=4096 (no bias) and at the `base`
# training shape (B=64, N=512, H=8, D=64, position + time bias), and is what runs with
# GENREC_TRITON_AUTOTUNE=0. Head dims above 128 fall back to small tiles.


def _cfg(bm, bn, warps, stages, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra}, num_warps=warps, num_stages=stages)


def _fcfg(bm, bn, warps, stages, early=0):
    """A forward configuration; ``early`` = EARLY_S (see ``_fwd_range_early``)."""
    return _cfg(bm, bn, warps, stages, EARLY_S=early)


def fwd_configs(head_dim: int, rab: bool) -> list:
    if head_dim > 128:
        return [_fcfg(64, 32, 4, 2), _fcfg(64, 16, 4, 2)]
    if rab:
        return [_fcfg(64, 32, 4, 3), _fcfg(64, 16, 4, 3), _fcfg(64, 64, 4, 3), _fcfg(64, 32, 4, 2),
                _fcfg(128, 32, 8, 3)]
    return [_fcfg(64, 32, 4, 3, early=1), _fcfg(64, 32, 4, 3), _fcfg(128, 128, 8, 3), _fcfg(128, 64, 4, 2),
            _fcfg(128, 64, 8, 3), _fcfg(64, 64, 4, 2)]


def bwd_configs(head_dim: int, rab: bool) -> list:
    """BLOCK_N (keys) must be a multiple of BLOCK_M (queries)."""
    if head_dim > 128:
        return [_cfg(16, 32, 4, 2), _cfg(16, 64, 8, 2)]
    if rab:
        return [_cfg(32, 64, 4, 3), _cfg(16, 64, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 128, 8, 2)]
    return [_cfg(32, 128, 8, 3), _cfg(64, 128, 8, 2), _cfg(32, 128, 8, 2), _cfg(16, 128, 8, 2)]


def dq_configs(head_dim: int, rab: bool) -> list:
    """The separate dQ kernel holds dq [BM, D] f32 plus the q and dO tiles."""
    if head_dim > 128:
        return [_cfg(64, 32, 4, 2)]
    if rab:
        return [_cfg(64, 32, 4, 3), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]
    return [_cfg(128, 64, 8, 4), _cfg(64, 64, 4, 2), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 4)]


def bwd_stored_configs(head_dim: int, rab: bool) -> list:
    """``bwd_configs`` with the first one's BLOCK_N: with ``dq_mode="stored"`` the dS buffer's
    layout (``_ds_slab``) is fixed before a configuration is chosen."""
    configs = bwd_configs(head_dim, rab)
    slab = configs[0].kwargs["BLOCK_N"]
    return [c for c in configs if c.kwargs["BLOCK_N"] == slab]


def dq_stored_configs(head_dim: int, rab: bool, slab: int) -> list:
    """The stored-dS dQ kernel: one product per tile, bound by reading dS; BLOCK_M and
    BLOCK_N (key rows per step) must divide the slab (the backward's BLOCK_N)."""
    del head_dim, rab  # the tile holds no bias work; listed for a uniform ``autotuned`` key
    cands = [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 128, 4, 2), _cfg(128, 128, 8, 2),
             _cfg(64, 32, 4, 3), _cfg(32, 32, 4, 2), _cfg(16, 16, 4, 2)]
    return [c for c in cands if slab % c.kwargs["BLOCK_M"] == 0 and slab % c.kwargs["BLOCK_N"] == 0]


def cached_configs(num_queries: int) -> list:
    if num_queries <= 16:
        return [_cfg(16, 64, 4, 3), _cfg(16, 128, 4, 2)]
    return [_cfg(64, 64, 4, 3), _cfg(64, 128, 8, 2)]


_KERNELS = {"fwd": (_hstu_fwd_kernel, fwd_configs), "bwd": (_hstu_bwd_kernel, bwd_configs),
            "dq": (_hstu_bwd_dq_kernel, dq_configs), "cached": (_hstu_cached_kernel, cached_configs),
            "bwds": (_hstu_bwd_kernel, bwd_stored_configs), "dqs": (_hstu_bwd_dq_stored_kernel, dq_stored_configs)}


@functools.lru_cache(maxsize=None)
def autotuned(kind: str, *config_args) -> triton.runtime.Autotuner:
    """The autotuned kernel ``kind`` ("fwd", "bwd", "dq", "cached"; "bwds", "dqs": the pair of
    ``dq_mode="stored"``) over its configuration list called with ``*config_args``."""
    kernel, configs = _KERNELS[kind]
    key = "cache_len" if kind == "cached" else "pad_rows"
    return triton.autotune(configs=configs(*config_args), key=[key])(kernel)


# Sequences at least this long run the forward and backward kernels in the grouped launch
# order (``_block_of_program``). H100, B=32 H=4 D=128: grouped faster at N=4096 and 8192,
# equal at 1024; plain faster at N=256 and at the training shape (N=512, D=64, bias).
GROUP_MIN_LEN = 2048

# Small blocks for the CPU interpreter: several blocks per test sequence, fast to interpret.
INTERPRET_FWD_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "EARLY_S": 0, "num_warps": 4, "num_stages": 1}
INTERPRET_BWD_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
INTERPRET_CACHED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
INTERPRET_DQ_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
INTERPRET_DQS_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
DQ_MODES = ("auto", "atomic", "separate", "stored")  # "auto": genrec_jax.ops.hstu_attention.auto_stores_ds


# --------------------------------------------------------------------------- wrappers


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(int(d)))


def _pinned(**configs) -> tuple:
    return tuple((kind, tuple(sorted(cfg.items()))) for kind, cfg in configs.items() if cfg is not None)


def _dq_mode(dq_mode: str, *, batch: int, heads: int, max_seq_len: int, head_dim: int, rab: bool, dtype,
             bwd_config: dict | None, mode: str) -> str:
    """``dq_mode`` with "auto" resolved (``auto_stores_ds``)."""
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    if dq_mode != "auto":
        return dq_mode
    if max_seq_len < STORED_DS_MIN_LEN:
        return "atomic"
    if bwd_config is not None:
        slab = bwd_config["BLOCK_N"]
    elif mode == "interpret":
        slab = INTERPRET_BWD_CONFIG["BLOCK_N"]
    else:
        slab = bwd_stored_configs(head_dim, rab)[0].kwargs["BLOCK_N"]
    nbytes = stored_ds_bytes(batch, heads, max_seq_len, slab, jnp.dtype(dtype).itemsize)
    return "stored" if auto_stores_ds(max_seq_len, nbytes) else "atomic"


def stored_ds_bytes(batch: int, heads: int, max_seq_len: int, slab: int, itemsize: int = 2) -> int:
    """Bytes of the dS buffer that ``dq_mode="stored"`` allocates for one backward pass
    (``slab``: the backward's BLOCK_N; ``itemsize``: of the inputs' dtype)."""
    return stored_ds_elements(batch, heads, max_seq_len, slab) * itemsize


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array (the custom_vjp's non-diff argument)."""

    heads: int
    dqk: int
    dv: int
    alpha: float
    inv_max_len: float
    norm_count: bool
    has_targets: bool
    has_pos: bool
    has_time: bool
    padded: bool
    pad_rows: int
    max_seq_len: int
    num_pos: int
    num_buckets: int
    precision: str
    silu: tuple  # (forward, backward) _silu_mode
    dq_mode: str  # "atomic", "separate" or "stored" (see hstu_attention_triton)
    configs: tuple  # ((kernel kind, frozen config), ...) pinned by the caller
    mode: str

    @property
    def dq_atomic(self) -> bool:
        return self.dq_mode == "atomic"

    @property
    def dq_stored(self) -> bool:
        return self.dq_mode == "stored"

    def slab(self) -> int:
        """The backward's BLOCK_N, which sets the stored dS layout (``_ds_slab``)."""
        return self.config("bwd", resolve=True)["BLOCK_N"]

    def config(self, which: str, resolve: bool = False) -> dict | None:
        """The pinned configuration for kernel ``which``; None lets jax-triton autotune
        (``resolve``: the configuration every candidate shares the block sizes of instead)."""
        cfg = dict(self.configs).get(which)
        if cfg is not None:
            cfg = dict(cfg)
            if which == "fwd":
                cfg.setdefault("EARLY_S", 0)
            return cfg
        if self.mode == "interpret":
            dq = INTERPRET_DQS_CONFIG if self.dq_stored else INTERPRET_DQ_CONFIG
            return dict({"fwd": INTERPRET_FWD_CONFIG, "bwd": INTERPRET_BWD_CONFIG, "dq": dq}[which])
        if self.mode == "torch" or resolve:
            return launch.autotune_configs(self.kernel(which))[0]
        return None

    def kernel(self, which: str):
        d, rab = max(self.dqk, self.dv), self.has_pos or self.has_time
        if self.dq_stored and which == "bwd":
            return autotuned("bwds", d, rab)
        if self.dq_stored and which == "dq":
            return autotuned("dqs", d, rab, self.slab())
        return autotuned(which, d, rab)

    def meta(self, which: str) -> dict:
        return dict(H=self.heads, DQK=self.dqk, NORM_COUNT=self.norm_count, HAS_TARGETS=self.has_targets,
                    HAS_POS=self.has_pos, HAS_TIME=self.has_time, PADDED=self.padded, PRECISION=self.precision,
                    SILU=self.silu[0 if which == "fwd" else 1], NC=_table_nc(self.mode),
                    BLOCK_DQK=_block(self.dqk), BLOCK_DV=_block(self.dv),
                    GROUPED=self.max_seq_len >= GROUP_MIN_LEN)


def _forward(st: _Static, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts):
    t = q.shape[0]
    b = starts.shape[0]
    (out,) = launch.triton_call(
        q, k, v, starts, lens, targets, pos_bias, time_bias, ts, qts,
        st.alpha, st.inv_max_len, st.num_pos, st.num_buckets, st.pad_rows,
        kernel=st.kernel("fwd"),
        out_shape=[jax.ShapeDtypeStruct((t, st.heads, st.dv), q.dtype)],
        grid=lambda meta: (b * st.heads, triton.cdiv(st.max_seq_len, meta["BLOCK_M"])),
        name="hstu_attention_fwd", config=st.config("fwd"), mode=st.mode, DV=st.dv, **st.meta("fwd"),
    )
    return out


def _backward(st: _Static, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts, dout):
    t = q.shape[0]
    b = starts.shape[0]
    dq_shape = (t, st.heads, st.dqk) if st.dq_atomic else (1,)  # unused by the kernel without atomics
    if st.dq_stored:
        slab = st.slab()
        tiles = triton.cdiv(st.max_seq_len, slab)
        ds_shape = (stored_ds_elements(b, st.heads, st.max_seq_len, slab),)
        dq_cfg = st.config("dq", resolve=True)
        if slab % dq_cfg["BLOCK_M"] or slab % dq_cfg["BLOCK_N"]:
            raise ValueError(f"dq_mode='stored': dq_config's BLOCK_M and BLOCK_N must divide the backward's "
                             f"BLOCK_N ({slab}), got {dq_cfg}")
    else:
        slab, tiles, ds_shape = 0, 0, (1,)
    dq, dk, dv, dpos, dtime, ds = launch.triton_call(
        q, k, v, dout, starts, lens, targets, pos_bias, time_bias, ts, qts,
        st.alpha, st.inv_max_len, st.num_pos, st.num_buckets, st.pad_rows, tiles,
        kernel=st.kernel("bwd"),
        out_shape=[
            jax.ShapeDtypeStruct(dq_shape, jnp.float32),
            jax.ShapeDtypeStruct((t, st.heads, st.dqk), k.dtype),
            jax.ShapeDtypeStruct((t, st.heads, st.dv), v.dtype),
            jax.ShapeDtypeStruct(pos_bias.shape, jnp.float32),
            jax.ShapeDtypeStruct(time_bias.shape, jnp.float32),
            jax.ShapeDtypeStruct(ds_shape, q.dtype),
        ],
        grid=lambda meta: (b * st.heads, triton.cdiv(st.max_seq_len, meta["BLOCK_N"])),
        name="hstu_attention_bwd", zeroed_outputs=(0, 3, 4), config=st.config("bwd"), mode=st.mode,
        DV_DIM=st.dv, BLOCK_NB=max(16, triton.next_power_of_2(st.num_buckets)), ATOMIC_DQ=st.dq_atomic,
        STORE_DS=st.dq_stored, **st.meta("bwd"),
    )
    if st.dq_atomic:
        return dq.astype(q.dtype), dk, dv, dpos, dtime
    if st.dq_stored:
        (dq,) = launch.triton_call(
            ds, k, starts, lens, targets, st.alpha, st.pad_rows, tiles,
            kernel=st.kernel("dq"),
            out_shape=[jax.ShapeDtypeStruct((t, st.heads, st.dqk), q.dtype)],
            grid=lambda meta: (b * st.heads, triton.cdiv(st.max_seq_len, meta["BLOCK_M"])),
            name="hstu_attention_bwd_dq_stored", config=st.config("dq"), mode=st.mode,
            H=st.heads, DQK=st.dqk, HAS_TARGETS=st.has_targets, PADDED=st.padded, PRECISION=st.precision,
            SLAB=slab, BLOCK_DQK=_block(st.dqk), GROUPED=st.max_seq_len >= GROUP_MIN_LEN,
        )
        return dq, dk, dv, dpos, dtime
    (dq,) = launch.triton_call(
        q, k, v, dout, starts, lens, targets, pos_bias, time_bias, ts, qts,
        st.alpha, st.inv_max_len, st.num_pos, st.num_buckets, st.pad_rows,
        kernel=st.kernel("dq"),
        out_shape=[jax.ShapeDtypeStruct((t, st.heads, st.dqk), q.dtype)],
        grid=lambda meta: (b * st.heads, triton.cdiv(st.max_seq_len, meta["BLOCK_M"])),
        name="hstu_attention_bwd_dq", config=st.config("dq"), mode=st.mode, DV=st.dv, **st.meta("dq"),
    )
    return dq, dk, dv, dpos, dtime


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hstu_core(st, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts):
    return _forward(st, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts)


def _hstu_core_fwd(st, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts):
    out = _forward(st, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts)
    return out, (q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts)


def _hstu_core_bwd(st, res, dout):
    q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts = res
    dq, dk, dv, dpos, dtime = _backward(st, q, k, v, pos_bias, time_bias, starts, lens, targets, ts, qts, dout)
    return dq, dk, dv, dpos, dtime, None, None, None, None, None


_hstu_core.defvjp(_hstu_core_fwd, _hstu_core_bwd)


def _silu_mode(dtype, mode: str, sigmoid: str = "auto", kind: str = "fwd", has_bias: bool = False) -> int:
    """SiLU/sigmoid evaluation in kernel ``kind`` ("fwd", "cached": forward passes; "bwd", "dq":
    backward) (``sigmoid=``): "exact" is 1 / (1 + exp(-s)); "tanh" is 0.5 + 0.5 tanh(s / 2)
    with the one-instruction ``tanh.approx.f32`` on the GPU (one MUFU op per pair instead of
    two; relative error ~2^-11, below the bf16 rounding of A) and the same formula through exp
    in the CPU interpreter, which cannot run inline PTX. "auto": exact for fp32 inputs (their
    tests ask for 1e-5); for 16-bit inputs tanh, except in the forward passes with a relative
    bias, where the exact form measured faster on an H100 (B=64, N=512, H=8, D=64, pos+time:
    0.467 vs 0.675 ms autotuned; without the bias tanh wins, 0.091 vs 0.104 ms, and 1.06 vs
    1.19 ms at N=4096, D=128; the backward with the bias is faster with tanh, 1.02 vs 1.07 ms;
    ``bench/results/h100-2026-11-23c``)."""
    if sigmoid not in ("auto", "exact", "tanh"):
        raise ValueError(f"sigmoid must be 'auto', 'exact' or 'tanh', got {sigmoid!r}")
    if sigmoid == "exact" or (sigmoid == "auto" and jnp.dtype(dtype) == jnp.float32):
        return 0
    if sigmoid == "auto" and has_bias and kind in ("fwd", "cached"):
        return 0
    return 1 if mode == "interpret" else 2


def _table_nc(mode: str) -> int:
    """1: bias-table gathers by inline-PTX ``ld.global.nc`` (compiled GPU launches); 0: plain
    loads (the CPU interpreter, which cannot run PTX). See ``_table``."""
    return 0 if mode == "interpret" else 1


def _precision(dtype, precision: str | None) -> str:
    if jnp.dtype(dtype) != jnp.float32:
        return "tf32"  # ignored by 16-bit dots
    return precision or "ieee"


def _prepare_common(q, k, v, *, alpha, max_len, norm, pos_bias, time_bias, have_ts):
    if norm not in ("max_len", "causal_count"):
        raise ValueError(f"norm must be 'max_len' or 'causal_count', got {norm!r}")
    if time_bias is not None and not have_ts:
        raise ValueError("time_bias needs both timestamps and query_timestamps")
    if not (q.dtype == k.dtype == v.dtype):
        dt = jnp.result_type(q, k, v)
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if alpha is None:
        alpha = 1.0 / math.sqrt(q.shape[-1])
    pb = jnp.zeros((1,), jnp.float32) if pos_bias is None else pos_bias.astype(jnp.float32)
    tb = jnp.zeros((1,), jnp.float32) if time_bias is None else time_bias.astype(jnp.float32)
    return q, k, v, float(alpha), pb, tb


def hstu_attention_triton(
    q: jax.Array,  # [B, N, H, Dqk]
    k: jax.Array,  # [B, N, H, Dqk]
    v: jax.Array,  # [B, N, H, Dv]
    lengths: jax.Array,  # [B]
    *,
    alpha: float | None = None,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    num_targets: jax.Array | None = None,
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    query_timestamps: jax.Array | None = None,
    precision: str | None = None,
    sigmoid: Literal["auto", "exact", "tanh"] = "auto",
    dq_mode: Literal["auto", "atomic", "separate", "stored"] = "auto",
    fwd_config: dict | None = None,
    bwd_config: dict | None = None,
    dq_config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    """HSTU self-attention over padded sequences; same contract as
    ``genrec_jax.ops.hstu_attention.hstu_attention_reference`` (padding rows are zeros).

    Differentiable (``jax.grad`` w.r.t. q, k, v, pos_bias, time_bias) through Triton backward
    kernels. Extra options: ``precision`` for float32 inputs ("ieee", the default, or "tf32");
    ``dq_mode``: "atomic" (dQ added with f32 atomics by the key-major backward kernel),
    "separate" (a query-major kernel recomputes S; deterministic, no atomics) or "stored"
    (the key-major kernel also writes dS, a second kernel multiplies it by K; deterministic,
    with a dS buffer of ``stored_ds_bytes`` for the pass) or "auto" (the default: "stored"
    from ``STORED_DS_MIN_LEN`` events on while that buffer is at most
    ``STORED_DS_AUTO_MAX_BYTES``, "atomic" otherwise; ``genrec_jax.ops.hstu_attention``); ``sigmoid``:
    "exact", "tanh" (one ``tanh.approx`` instruction per pair on the GPU) or "auto" (tanh for
    16-bit inputs except the forward with a bias, exact for float32; see ``_silu_mode``);
    ``fwd_config``/``bwd_config``/``dq_config`` pin {"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"} instead of autotuning (the forward's may add "EARLY_S": 1, see
    ``_fwd_range_early``); ``launch_mode`` (see ``genrec_jax.kernels.launch``).
    """
    b, n, h, dqk = q.shape
    dv = v.shape[-1]
    q, k, v, alpha, pb, tb = _prepare_common(q, k, v, alpha=alpha, max_len=max_len, norm=norm, pos_bias=pos_bias,
                                             time_bias=time_bias,
                                             have_ts=timestamps is not None and query_timestamps is not None)
    has_time = time_bias is not None
    mode = launch_mode or launch.current_mode()
    st = _Static(
        heads=h, dqk=dqk, dv=dv, alpha=alpha, inv_max_len=1.0 / float(max_len), norm_count=norm == "causal_count",
        has_targets=num_targets is not None, has_pos=pos_bias is not None, has_time=has_time, padded=True,
        pad_rows=n, max_seq_len=n, num_pos=int(pb.shape[0]), num_buckets=int(tb.shape[0]),
        precision=_precision(q.dtype, precision),
        silu=tuple(_silu_mode(q.dtype, mode, sigmoid, kind, pos_bias is not None or has_time)
                   for kind in ("fwd", "bwd")),
        dq_mode=_dq_mode(dq_mode, batch=b, heads=h, max_seq_len=n, head_dim=max(dqk, dv),
                         rab=pos_bias is not None or has_time, dtype=q.dtype, bwd_config=bwd_config, mode=mode),
        configs=_pinned(fwd=fwd_config, bwd=bwd_config, dq=dq_config), mode=mode,
    )
    starts = jnp.arange(b, dtype=jnp.int32) * n
    lens = jnp.clip(lengths.astype(jnp.int32), 0, n)
    targets = jnp.zeros((b,), jnp.int32) if num_targets is None else num_targets.astype(jnp.int32)
    if has_time:
        ts = timestamps.reshape(b * n)
        qts = query_timestamps.reshape(b * n).astype(ts.dtype)
    else:
        ts = qts = jnp.zeros((1,), jnp.int32)
    out = _hstu_core(st, q.reshape(b * n, h, dqk), k.reshape(b * n, h, dqk), v.reshape(b * n, h, dv), pb, tb,
                     starts, lens, targets, ts, qts)
    return out.reshape(b, n, h, dv)


def hstu_attention_jagged_triton(
    q: jax.Array,  # [T, H, Dqk] packed values
    k: jax.Array,  # [T, H, Dqk]
    v: jax.Array,  # [T, H, Dv]
    seq_offsets: jax.Array,  # [B + 1] int: sequence b is rows [offsets[b], offsets[b+1])
    *,
    max_seq_len: int,  # static bound on every sequence's length (sets the grid)
    alpha: float | None = None,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    num_targets: jax.Array | None = None,  # [B]
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    timestamps: jax.Array | None = None,  # [T]
    query_timestamps: jax.Array | None = None,  # [T]
    precision: str | None = None,
    sigmoid: Literal["auto", "exact", "tanh"] = "auto",
    dq_mode: Literal["auto", "atomic", "separate", "stored"] = "auto",
    fwd_config: dict | None = None,
    bwd_config: dict | None = None,
    dq_config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    """HSTU self-attention over packed (jagged) sequences; returns [T, H, Dv].

    Rows past ``seq_offsets[-1]`` (if any) are left unspecified; sequences longer than
    ``max_seq_len`` are truncated to it."""
    t, h, dqk = q.shape
    dv = v.shape[-1]
    q, k, v, alpha, pb, tb = _prepare_common(q, k, v, alpha=alpha, max_len=max_len, norm=norm, pos_bias=pos_bias,
                                             time_bias=time_bias,
                                             have_ts=timestamps is not None and query_timestamps is not None)
    has_time = time_bias is not None
    mode = launch_mode or launch.current_mode()
    st = _Static(
        heads=h, dqk=dqk, dv=dv, alpha=alpha, inv_max_len=1.0 / float(max_len), norm_count=norm == "causal_count",
        has_targets=num_targets is not None, has_pos=pos_bias is not None, has_time=has_time, padded=False,
        pad_rows=0, max_seq_len=int(max_seq_len), num_pos=int(pb.shape[0]), num_buckets=int(tb.shape[0]),
        precision=_precision(q.dtype, precision),
        silu=tuple(_silu_mode(q.dtype, mode, sigmoid, kind, pos_bias is not None or has_time)
                   for kind in ("fwd", "bwd")),
        dq_mode=_dq_mode(dq_mode, batch=seq_offsets.shape[0] - 1, heads=h, max_seq_len=int(max_seq_len),
                         head_dim=max(dqk, dv), rab=pos_bias is not None or has_time, dtype=q.dtype,
                         bwd_config=bwd_config, mode=mode),
        configs=_pinned(fwd=fwd_config, bwd=bwd_config, dq=dq_config), mode=mode,
    )
    offs = seq_offsets.astype(jnp.int32)
    starts = offs[:-1]
    lens = jnp.clip(offs[1:] - offs[:-1], 0, int(max_seq_len))
    b = starts.shape[0]
    targets = jnp.zeros((b,), jnp.int32) if num_targets is None else num_targets.astype(jnp.int32)
    if has_time:
        ts = timestamps
        qts = query_timestamps.astype(ts.dtype)
    else:
        ts = qts = jnp.zeros((1,), jnp.int32)
    return _hstu_core(st, q, k, v, pb, tb, starts, lens, targets, ts, qts)


def hstu_attention_cached_triton(
    q: jax.Array,  # [B, M, H, Dqk]
    k_cache: jax.Array,  # [B, C, H, Dqk]
    v_cache: jax.Array,  # [B, C, H, Dv]
    q_positions: jax.Array,  # [B, M]
    kv_lengths: jax.Array,  # [B]
    *,
    alpha: float | None = None,
    max_len: int,
    norm: Literal["max_len", "causal_count"] = "max_len",
    hist_lengths: jax.Array | None = None,
    pos_bias: jax.Array | None = None,
    time_bias: jax.Array | None = None,
    k_timestamps: jax.Array | None = None,  # [B, C]
    q_timestamps: jax.Array | None = None,  # [B, M]
    precision: str | None = None,
    sigmoid: Literal["auto", "exact", "tanh"] = "auto",
    config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    """New queries against a K/V cache; same contract as
    ``genrec_jax.ops.hstu_attention.hstu_attention_cached`` (inference only: no VJP)."""
    b, m, h, dqk = q.shape
    c = k_cache.shape[1]
    dv = v_cache.shape[-1]
    q, k_cache, v_cache, alpha, pb, tb = _prepare_common(
        q, k_cache, v_cache, alpha=alpha, max_len=max_len, norm=norm, pos_bias=pos_bias, time_bias=time_bias,
        have_ts=k_timestamps is not None and q_timestamps is not None)
    has_time = time_bias is not None
    mode = launch_mode or launch.current_mode()
    if config is None and mode == "interpret":
        config = INTERPRET_CACHED_CONFIG
    if has_time:
        kts = k_timestamps
        qts = q_timestamps.astype(kts.dtype)
    else:
        kts = qts = jnp.zeros((1,), jnp.int32)
    hist = jnp.zeros((b,), jnp.int32) if hist_lengths is None else hist_lengths.astype(jnp.int32)
    meta = dict(H=h, DQK=dqk, DV=dv, NORM_COUNT=norm == "causal_count", HAS_HIST=hist_lengths is not None,
                HAS_POS=pos_bias is not None, HAS_TIME=has_time, PRECISION=_precision(q.dtype, precision),
                SILU=_silu_mode(q.dtype, mode, sigmoid, "cached", pos_bias is not None or has_time),
                NC=_table_nc(mode),
                BLOCK_DQK=_block(dqk), BLOCK_DV=_block(dv))
    (out,) = launch.triton_call(
        q, k_cache, v_cache, q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32), hist, pb, tb, kts, qts,
        alpha, 1.0 / float(max_len), int(pb.shape[0]), int(tb.shape[0]), m, c,
        kernel=autotuned("cached", 16 if m <= 16 else 64),
        out_shape=[jax.ShapeDtypeStruct((b, m, h, dv), q.dtype)],
        grid=lambda meta_: (b * h, triton.cdiv(m, meta_["BLOCK_M"])),
        name="hstu_attention_cached", config=config, mode=mode, **meta,
    )
    return out

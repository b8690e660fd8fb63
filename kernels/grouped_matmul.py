"""Triton grouped matmul for the MoE's ``blocked`` routing: row tiles times their expert's weights.

The routing sorts the token copies by expert and pads each expert's group to whole tiles
of M rows, so a tile belongs to one expert and the tiles of an expert are contiguous:

    out[t] = x[t] @ w[e_t]                     x [T, M, K], w [E, K, N], e_t non-decreasing

The XLA formulation (``genrec_jax.ops.grouped_matmul.grouped_matmul_reference``) first
copies every tile's expert weights (a one-hot product, [T, K, N]) and runs one batched
matmul; at the ``base`` shape that copy is T / E = 17 times the weights, written and read
forward and backward (~0.9 GB per layer and step). These kernels read ``w[e_t]`` in place:

* ``_gmm_kernel``: program = (BLOCK_M rows of one tile, BLOCK_N columns); the tile's expert
  is one scalar load, then an ordinary K loop. With the weight strides swapped it computes
  ``dy[t] @ w[e_t]^T``: the input gradient.
* ``_gmm_wgrad_kernel``: program = (expert, BLOCK_K x BLOCK_N block of dw[e]); it walks the
  rows of the expert's tiles, ``[first[e] M, last[e] M)``, in BLOCK_M steps:
  ``dw[e] = sum_t x[t]^T dy[t]``. An expert without tiles writes zeros.

bfloat16 / float16 operands run on the tensor cores with float32 accumulation; float32
operands use ``input_precision="ieee"`` unless ``precision="tf32"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from genrec_jax.kernels import launch


@triton.jit
def _gmm_kernel(
    X,  # [T, M, K] row-major
    W,  # expert weights, element (e, k, n) at W + e*S_E + k*S_K + n*S_N
    TE,  # [T] int32 expert of each tile
    OUT,  # [T, M, N]
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
    S_E: tl.constexpr, S_K: tl.constexpr, S_N: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (T * M / BLOCK_M, cdiv(N, BLOCK_N)); BLOCK_M divides M, so a row block lies in
    one tile."""
    row0 = tl.program_id(0) * BLOCK_M
    e = tl.load(TE + row0 // M).to(tl.int64)
    offs_r = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr = X + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptr = W + e * S_E + offs_k[:, None] * S_K + offs_n[None, :] * S_N
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(x_ptr, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K * S_K
    out = OUT + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _gmm_wgrad_kernel(
    X,  # [T, M, K]
    DY,  # [T, M, N]
    FIRST,  # [E] int32 first tile of each expert
    LAST,  # [E] int32 one past its last tile
    DW,  # [E, K, N]
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (E, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)): dw[e, k-block, n-block] = sum over the
    rows of expert e's tiles of x^T dy."""
    e = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    n_ok = offs_n < N
    lo = tl.load(FIRST + e) * M
    hi = tl.load(LAST + e) * M
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = (r0 + offs_m).to(tl.int64)
        a = tl.load(X + rows[None, :] * K + offs_k[:, None], mask=k_ok[:, None], other=0.0)  # [BK, BM] = x^T
        b = tl.load(DY + rows[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0)  # [BM, BN]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = DW + e.to(tl.int64) * (K * N) + offs_k[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=None)
def autotuned(kind: str):
    """Configurations, best first for bf16 on Hopper at the ``base`` MoE shape (M=512,
    K=512, N=1024 and back) by their shapes; GENREC_TRITON_AUTOTUNE=0 runs the first."""
    if kind == "fwd":  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                  (64, 64, 64, 4, 3)]  # 128x256 with 3 stages asked 240 KB of shared memory (H100: 227)
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in shapes]
        return triton.autotune(configs=configs, key=["M", "K", "N"])(_gmm_kernel)
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
    configs = [triton.Config({"BLOCK_K": k, "BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=s)
               for k, n, m, w, s in shapes]
    return triton.autotune(configs=configs, key=["M", "K", "N"])(_gmm_wgrad_kernel)


INTERPRET_CONFIG = {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
                    "wgrad": {"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_M": 16, "num_warps": 4, "num_stages": 1}}


@dataclasses.dataclass(frozen=True)
class _Static:
    precision: str
    mode: str
    config: tuple | None  # pinned {"BLOCK_*", "num_warps", "num_stages"} for both kinds

    def launch_config(self, kind: str, m: int) -> dict | None:
        if self.config is not None:
            cfg = dict(self.config)
        elif self.mode == "interpret":
            cfg = dict(INTERPRET_CONFIG[kind])
        elif self.mode == "torch" or m < 128:  # pin a configuration whose BLOCK_M fits the tile
            cfg = launch.autotune_configs(autotuned(kind))[0]
        else:
            return None
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], m)
        return cfg


def _matmul(st: _Static, x, w, te, *, transpose: bool):
    """x [T, M, K'] times w[e_t] ([E, K', N']) or its transpose (w [E, N', K'])."""
    t, m, kd = x.shape
    if transpose:  # w [E, N, K]: element (e, k, n) of w[e]^T at e*N*K + n*K + k
        n = w.shape[1]
        strides = dict(S_E=n * kd, S_K=1, S_N=kd)
    else:
        n = w.shape[2]
        strides = dict(S_E=kd * n, S_K=n, S_N=1)
    (out,) = launch.triton_call(
        x, w, te,
        kernel=autotuned("fwd"),
        out_shape=[jax.ShapeDtypeStruct((t, m, n), x.dtype)],
        grid=lambda meta: (t * m // meta["BLOCK_M"], triton.cdiv(n, meta["BLOCK_N"])),
        name="grouped_matmul_t" if transpose else "grouped_matmul", config=st.launch_config("fwd", m), mode=st.mode,
        M=m, K=kd, N=n, PRECISION=st.precision, **strides,
    )
    return out


def _wgrad(st: _Static, x, dy, te, num_experts: int, w_dtype):
    t, m, kd = x.shape
    n = dy.shape[2]
    ids = jnp.arange(num_experts, dtype=te.dtype)
    first = jnp.searchsorted(te, ids, side="left").astype(jnp.int32)
    last = jnp.searchsorted(te, ids, side="right").astype(jnp.int32)
    (dw,) = launch.triton_call(
        x, dy, first, last,
        kernel=autotuned("wgrad"),
        out_shape=[jax.ShapeDtypeStruct((num_experts, kd, n), w_dtype)],
        grid=lambda meta: (num_experts, triton.cdiv(kd, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"])),
        name="grouped_matmul_wgrad", config=st.launch_config("wgrad", m), mode=st.mode,
        M=m, K=kd, N=n, PRECISION=st.precision,
    )
    return dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_core(st, x, w, te):
    return _matmul(st, x, w, te, transpose=False)


def _core_fwd(st, x, w, te):
    return _matmul(st, x, w, te, transpose=False), (x, w, te)


def _core_bwd(st, res, dy):
    x, w, te = res
    dy = dy.astype(x.dtype)
    dx = _matmul(st, dy, w, te, transpose=True)
    dw = _wgrad(st, x, dy, te, w.shape[0], w.dtype)
    return dx, dw, None


_gmm_core.defvjp(_core_fwd, _core_bwd)


def grouped_matmul_triton(
    x: jax.Array,  # [T, M, K]
    w: jax.Array,  # [E, K, N]
    tile_expert: jax.Array,  # [T] int, non-decreasing, in [0, E)
    *,
    precision: str | None = None,
    config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    """[T, M, N] = x[t] @ w[tile_expert[t]], differentiable w.r.t. x and w; same contract as
    ``genrec_jax.ops.grouped_matmul.grouped_matmul_reference``. M must be a power of two >= 16
    (the routing's block rows are); ``tile_expert`` must be sorted (the wgrad kernel reads
    each expert's tiles as one range). ``config`` pins {"BLOCK_M", "BLOCK_N", "BLOCK_K",
    "num_warps", "num_stages"} for all three kernels."""
    t, m, kd = x.shape
    if m < 16 or m & (m - 1):
        raise ValueError(f"grouped_matmul_triton: rows per tile must be a power of two >= 16, got {m}")
    if w.shape[1] != kd:
        raise ValueError(f"grouped_matmul_triton: x has K={kd}, w has K={w.shape[1]}")
    w = w.astype(x.dtype)
    prec = (precision or "ieee") if x.dtype == jnp.float32 else "tf32"
    st = _Static(precision=prec, mode=launch_mode or launch.current_mode(),
                 config=None if config is None else tuple(sorted(config.items())))
    return _gmm_core(st, x, w, tile_expert.astype(jnp.int32))

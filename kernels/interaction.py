"""Triton kernels for the pairwise dot-product feature interaction (DLRM style).

For each row b with feature embeddings x_b [F, D]:

    G_b = x_b x_b^T                                     [F, F]
    out_b = concat(dense_b, [G_b[i, j] for i < j])      [Dd + F(F-1)/2]   (i-major order)

pair (i, j), i < j, sits at column Dd + p(i, j) with p(i, j) = i F - i (i + 1) / 2 + (j - i - 1).

Backward, with dG_b[i, j] = dout_b[Dd + p(i, j)] for i < j (zero elsewhere):

    dx_b = (dG_b + dG_b^T) x_b          d dense_b = dout_b[:Dd]

A program handles BLOCK_B batch rows (one after another, 2-D tiles) and BLOCK_I rows of G;
G is accumulated over D in BLOCK_D chunks. Memory bound: the forward reads x once from DRAM
(the i-blocks of one row re-read it from cache) and writes the output once.
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
def _copy_dense(DENSE, out_row, row, row_ok, DD: tl.constexpr, BLOCK_DD: tl.constexpr):
    """out_row[:DD] = dense[row] (cast to the output dtype)."""
    offs_c = tl.arange(0, BLOCK_DD)
    for c0 in range(0, DD, BLOCK_DD):
        cc = c0 + offs_c
        m = row_ok & (cc < DD)
        val = tl.load(DENSE + row.to(tl.int64) * DD + cc, mask=m, other=0.0)  # [BDD]
        tl.store(out_row + cc, val.to(out_row.dtype.element_ty), mask=m)


@triton.jit
def _interaction_fwd_kernel(
    X,  # [B, F, D]
    DENSE,  # [B, DD] (unused unless HAS_DENSE)
    num_rows,  # i32: B
    OUT,  # [B, DD + F(F-1)/2]
    F: tl.constexpr, D: tl.constexpr, DD: tl.constexpr,
    HAS_DENSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DD: tl.constexpr, ROW_STAGES: tl.constexpr,
):
    """Grid (cdiv(B, BLOCK_B), cdiv(F, BLOCK_I)): rows G[i0:i0+BLOCK_I, :] = x[i-block] x^T of
    BLOCK_B batch rows, their i < j entries stored i-major. When one tile holds a row's whole
    x (BLOCK_I >= F, BLOCK_D >= D), x is loaded once per row for both operands and the row loop
    is software-pipelined (``ROW_STAGES``): the next rows' loads are in flight while this
    row's product is stored."""
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] feature rows of G
    offs_f = tl.arange(0, BLOCK_F)  # [BF] feature columns of G
    offs_d = tl.arange(0, BLOCK_D)
    i = offs_i[:, None]
    j = offs_f[None, :]
    col = DD + i * F - (i * (i + 1)) // 2 + (j - i - 1)  # [BI, BF] output column of pair (i, j)
    upper = (i < j) & (j < F)
    if BLOCK_I >= F and BLOCK_D >= D:
        for r in tl.range(0, BLOCK_B, num_stages=ROW_STAGES):
            row = tl.program_id(0) * BLOCK_B + r
            row_ok = row < num_rows
            out_row = OUT + row.to(tl.int64) * (DD + F * (F - 1) // 2)
            x = tl.load(X + row.to(tl.int64) * (F * D) + offs_f[:, None] * D + offs_d[None, :],
                        mask=row_ok & (offs_f < F)[:, None] & (offs_d < D)[None, :], other=0.0)  # [BF, BD]
            g = tl.dot(x, tl.trans(x), input_precision=PRECISION)  # [BF, BF]
            tl.store(out_row + col, g.to(OUT.dtype.element_ty), mask=row_ok & upper)
            if HAS_DENSE:
                _copy_dense(DENSE, out_row, row, row_ok, DD, BLOCK_DD)
    else:
        for r in tl.static_range(BLOCK_B):
            row = tl.program_id(0) * BLOCK_B + r
            row_ok = row < num_rows
            x_row = X + row.to(tl.int64) * (F * D)
            out_row = OUT + row.to(tl.int64) * (DD + F * (F - 1) // 2)
            g = tl.zeros([BLOCK_I, BLOCK_F], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                xi = tl.load(x_row + offs_i[:, None] * D + dd[None, :],
                             mask=row_ok & (offs_i < F)[:, None] & (dd < D)[None, :], other=0.0)  # [BI, BD]
                xa = tl.load(x_row + offs_f[:, None] * D + dd[None, :],
                             mask=row_ok & (offs_f < F)[:, None] & (dd < D)[None, :], other=0.0)  # [BF, BD]
                g = tl.dot(xi, tl.trans(xa), g, input_precision=PRECISION)  # [BI, BF]
            tl.store(out_row + col, g.to(OUT.dtype.element_ty), mask=row_ok & upper)
            if HAS_DENSE:
                if tl.program_id(1) == 0:
                    _copy_dense(DENSE, out_row, row, row_ok, DD, BLOCK_DD)


@triton.jit
def _interaction_bwd_kernel(
    X,  # [B, F, D]
    DOUT,  # [B, DD + F(F-1)/2]
    num_rows,
    DX,  # [B, F, D]
    F: tl.constexpr, D: tl.constexpr, DD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_STAGES: tl.constexpr,
):
    """Grid (cdiv(B, BLOCK_B), cdiv(F, BLOCK_I)): dx[i-block] = S[i-block, :] x with
    S = dG + dG^T gathered from dout in one load (S[i, j] = dout[p(min, max)], S[i, i] = 0).
    With one tile per row (BLOCK_I >= F, BLOCK_D >= D) the row loop is pipelined as in the
    forward."""
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_f = tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    i = offs_i[:, None]
    j = offs_f[None, :]
    upper = (i < j) & (j < F)
    lower = (j < i) & (i < F)
    col = tl.where(upper, DD + i * F - (i * (i + 1)) // 2 + (j - i - 1), DD + j * F - (j * (j + 1)) // 2 + (i - j - 1))
    if BLOCK_I >= F and BLOCK_D >= D:
        for r in tl.range(0, BLOCK_B, num_stages=ROW_STAGES):
            row = tl.program_id(0) * BLOCK_B + r
            row_ok = row < num_rows
            sym = tl.load(DOUT + row.to(tl.int64) * (DD + F * (F - 1) // 2) + col, mask=row_ok & (upper | lower),
                          other=0.0)  # [BF, BF]
            tile = row.to(tl.int64) * (F * D) + offs_f[:, None] * D + offs_d[None, :]
            ok = row_ok & (offs_f < F)[:, None] & (offs_d < D)[None, :]
            x = tl.load(X + tile, mask=ok, other=0.0)  # [BF, BD]
            dx = tl.dot(sym.to(x.dtype), x, input_precision=PRECISION)  # [BF, BD] f32
            tl.store(DX + tile, dx.to(DX.dtype.element_ty), mask=ok)
    else:
        for r in tl.static_range(BLOCK_B):
            row = tl.program_id(0) * BLOCK_B + r
            row_ok = row < num_rows
            sym = tl.load(DOUT + row.to(tl.int64) * (DD + F * (F - 1) // 2) + col, mask=row_ok & (upper | lower),
                          other=0.0)  # [BI, BF]
            x_row = X + row.to(tl.int64) * (F * D)
            dx_row = DX + row.to(tl.int64) * (F * D)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                x = tl.load(x_row + offs_f[:, None] * D + dd[None, :],
                            mask=row_ok & (offs_f < F)[:, None] & (dd < D)[None, :], other=0.0)  # [BF, BD]
                dx = tl.dot(sym.to(x.dtype), x, input_precision=PRECISION)  # [BI, BD] f32
                tl.store(dx_row + offs_i[:, None] * D + dd[None, :], dx.to(DX.dtype.element_ty),
                         mask=row_ok & (offs_i < F)[:, None] & (dd < D)[None, :])


# --------------------------------------------------------------------------- configs


def _block_f(f: int) -> int:
    return max(16, triton.next_power_of_2(f))


def _block_d(d: int, block_f: int) -> int:
    return max(16, min(triton.next_power_of_2(d), 64 if block_f >= 128 else 128))


@functools.lru_cache(maxsize=None)
def autotuned(kind: str, block_f: int):
    """Autotuned forward/backward kernel for a feature block size: rows per program, G rows
    per program and warps (static sm_90 compiles of these: kernels/NOTES.md). The first of
    each list (what GENREC_TRITON_AUTOTUNE=0 runs) is within 12% of the fastest measured on
    an H100 for both passes at B=4096, D=128 (`python bench/kernels.py --only interaction
    --verbose`)."""
    if block_f <= 32:  # (BLOCK_B, BLOCK_I, warps, ROW_STAGES): whole-row tiles, pipelined over rows
        shapes = [(4, block_f, 4, 1), (1, block_f, 4, 1), (8, block_f, 4, 1), (32, block_f, 4, 3),
                  (64, block_f, 4, 4), (16, block_f, 2, 3)]
    elif block_f == 64:
        shapes = [(1, 64, 4, 1), (1, 32, 4, 1), (2, 64, 8, 1), (1, 64, 8, 1), (8, 64, 4, 3), (16, 64, 4, 3),
                  (16, 64, 8, 2)]
    else:
        shapes = [(1, 64, 8, 1), (1, 32, 4, 1), (1, 32, 8, 1), (1, 16, 4, 1)]
    configs = [triton.Config({"BLOCK_B": bb, "BLOCK_I": bi, "ROW_STAGES": rs}, num_warps=w, num_stages=2)
               for bb, bi, w, rs in shapes]
    kernel = _interaction_fwd_kernel if kind == "fwd" else _interaction_bwd_kernel
    return triton.autotune(configs=configs, key=["num_rows"])(kernel)


INTERPRET_CONFIG = {"BLOCK_B": 2, "BLOCK_I": 16, "ROW_STAGES": 1, "num_warps": 4, "num_stages": 1}


@dataclasses.dataclass(frozen=True)
class _Static:
    f: int
    d: int
    dd: int
    has_dense: bool
    precision: str
    block_d: int
    config: tuple | None
    mode: str

    def launch_config(self, kind: str) -> dict | None:
        if self.config is not None:
            return {"ROW_STAGES": 1, **dict(self.config)}
        if self.mode == "interpret":
            return dict(INTERPRET_CONFIG)
        if self.mode == "torch":
            return launch.autotune_configs(autotuned(kind, _block_f(self.f)))[0]
        return None


def _fwd(st: _Static, x, dense):
    b = x.shape[0]
    (out,) = launch.triton_call(
        x, dense, b,
        kernel=autotuned("fwd", _block_f(st.f)),
        out_shape=[jax.ShapeDtypeStruct((b, st.dd + st.f * (st.f - 1) // 2), x.dtype)],
        grid=lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), triton.cdiv(st.f, meta["BLOCK_I"])),
        name="pairwise_interaction_fwd", config=st.launch_config("fwd"), mode=st.mode,
        F=st.f, D=st.d, DD=st.dd, HAS_DENSE=st.has_dense, PRECISION=st.precision, BLOCK_F=_block_f(st.f),
        BLOCK_D=st.block_d, BLOCK_DD=min(1024, max(16, triton.next_power_of_2(max(st.dd, 1)))),
    )
    return out


def _bwd_dx(st: _Static, x, dout):
    b = x.shape[0]
    (dx,) = launch.triton_call(
        x, dout, b,
        kernel=autotuned("bwd", _block_f(st.f)),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
        grid=lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), triton.cdiv(st.f, meta["BLOCK_I"])),
        name="pairwise_interaction_bwd", config=st.launch_config("bwd"), mode=st.mode,
        F=st.f, D=st.d, DD=st.dd, PRECISION=st.precision, BLOCK_F=_block_f(st.f), BLOCK_D=st.block_d,
    )
    return dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _interaction_core(st, x, dense):
    return _fwd(st, x, dense)


def _core_fwd(st, x, dense):
    return _fwd(st, x, dense), (x, dense)


def _core_bwd(st, res, dout):
    x, dense = res
    dx = _bwd_dx(st, x, dout)
    ddense = dout[:, : st.dd].astype(dense.dtype) if st.has_dense else jnp.zeros_like(dense)
    return dx, ddense


_interaction_core.defvjp(_core_fwd, _core_bwd)


def interaction_triton(
    x: jax.Array,  # [B, F, D]
    dense: jax.Array | None = None,  # [B, Dd]
    *,
    precision: str | None = None,
    config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    """[B, Dd + F(F-1)/2]: ``dense`` (cast to x's dtype) then the i < j dot products of the
    rows of x, i-major; same contract as ``genrec_jax.ops.interaction.pairwise_interaction_reference``.
    Differentiable w.r.t. x and dense. ``precision`` applies to float32 ("ieee" default, or
    "tf32"); ``config`` pins {"BLOCK_B", "BLOCK_I", "num_warps", "num_stages"[, "ROW_STAGES"]}
    instead of autotuning."""
    b, f, d = x.shape
    if dense is not None:
        dense = dense.astype(x.dtype)
    if f < 2:  # no pairs
        return dense if dense is not None else jnp.zeros((b, 0), x.dtype)
    mode = launch_mode or launch.current_mode()
    prec = (precision or "ieee") if x.dtype == jnp.float32 else "tf32"
    st = _Static(f=f, d=d, dd=0 if dense is None else dense.shape[1], has_dense=dense is not None, precision=prec,
                 block_d=16 if mode == "interpret" else _block_d(d, _block_f(f)),
                 config=None if config is None else tuple(sorted(config.items())), mode=mode)
    return _interaction_core(st, x, jnp.zeros((1, 1), x.dtype) if dense is None else dense)

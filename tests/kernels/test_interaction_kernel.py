"""Pairwise feature interaction: reference op, Triton kernels (interpreter / GPU), dispatch.

* always run: ``pairwise_interaction_reference`` against a float64 NumPy loop, its gradient
  against ``jax.grad`` of a float64 version, backend dispatch on CPU;
* Triton interpreter (needs triton + CPU torch; CI installs neither): forward and backward
  kernels through the jax wrapper with NaN-poisoned outputs, odd sizes, F = 1 and 2;
* ``@pytest.mark.gpu``: the same through jax-triton.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.ops.interaction import pairwise_interaction, pairwise_interaction_reference

from tests.kernels.markers import needs_gpu, needs_interpreter, needs_triton

SHAPES = [  # B, F, D, Dd
    (5, 7, 33, 3),
    (3, 2, 16, 0),
    (4, 17, 20, 5),
    (2, 50, 8, 0),
    (5, 12, 8, 3),  # whole row in one tile (interpreter: BLOCK_I = BLOCK_D = 16): the pipelined row loop
    (3, 1, 8, 2),
    (1, 3, 1, 1),
]


def loop64(x, dense=None):
    """The definition, in float64 loops."""
    x = np.asarray(x, np.float64)
    b, f, _ = x.shape
    rows = []
    for r in range(b):
        pairs = [x[r, i] @ x[r, j] for i in range(f) for j in range(i + 1, f)]
        head = [] if dense is None else list(np.asarray(dense[r], np.float64))
        rows.append(head + pairs)
    return np.array(rows, np.float64).reshape(b, -1)


def grads64(x, dense, cot):
    """jax.grad of a float64 einsum version (one jit per shape)."""
    with jax.enable_x64(True):
        f = x.shape[1]
        iu, ju = np.triu_indices(f, k=1)

        def loss(x_, d_, c_):
            g = jnp.einsum("bfd,bgd->bfg", x_, x_)[:, iu, ju]
            out = g if d_ is None else jnp.concatenate([d_, g], axis=1)
            return jnp.sum(out * c_)

        xs = np.asarray(x, np.float64)
        cot = np.asarray(cot, np.float64)
        if dense is None:
            return np.asarray(jax.jit(jax.grad(lambda a, c: loss(a, None, c)))(xs, cot)), None
        dx, dd = jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, np.asarray(dense, np.float64), cot)
        return np.asarray(dx), np.asarray(dd)


def grads64_numpy(x, dense, cot):
    """The analytic float64 gradient: dx_b = (dG_b + dG_b^T) x_b, d dense = cot[:, :Dd]."""
    b, f, _ = x.shape
    dd = 0 if dense is None else dense.shape[1]
    iu, ju = np.triu_indices(f, k=1)
    dg = np.zeros((b, f, f))
    dg[:, iu, ju] = np.asarray(cot, np.float64)[:, dd:]
    dx = np.einsum("bfg,bgd->bfd", dg + dg.transpose(0, 2, 1), np.asarray(x, np.float64))
    return dx, (None if dense is None else np.asarray(cot, np.float64)[:, :dd])


def test_analytic_gradient_matches_jax_grad_float64():
    rng = np.random.default_rng(2)
    x, dense = _inputs(rng, 3, 6, 5, 2)
    cot = rng.standard_normal((3, 2 + 15))
    for got, want in zip(grads64_numpy(x, dense, cot), grads64(x, dense, cot)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def rel_err(got, want) -> float:
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (an unwritten poisoned element?)"
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def _inputs(rng, b, f, d, dd, dtype=np.float32):
    x = rng.standard_normal((b, f, d)).astype(np.float32)
    dense = rng.standard_normal((b, dd)).astype(np.float32) if dd else None
    x = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))  # exactly representable in dtype
    if dense is not None:
        dense = np.asarray(jnp.asarray(dense).astype(dtype).astype(jnp.float32))
    return x, dense


# --------------------------------------------------------------------------- always run


@pytest.mark.parametrize("b,f,d,dd", SHAPES)
def test_reference_matches_float64_loop(b, f, d, dd):
    rng = np.random.default_rng(b * 1000 + f * 10 + d)
    x, dense = _inputs(rng, b, f, d, dd)
    got = jax.jit(pairwise_interaction_reference)(jnp.asarray(x), None if dense is None else jnp.asarray(dense))
    assert got.shape == (b, dd + f * (f - 1) // 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), loop64(x, dense), rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("b,f,d,dd", SHAPES)
def test_reference_gradient_matches_float64(b, f, d, dd):
    rng = np.random.default_rng(7 + b + f + d)
    x, dense = _inputs(rng, b, f, d, dd)
    cot = rng.standard_normal((b, dd + f * (f - 1) // 2)).astype(np.float32)
    want_dx, want_dd = grads64(x, dense, cot)
    ref = pairwise_interaction_reference
    if dense is None:
        dx = jax.jit(jax.grad(lambda a: jnp.sum(ref(a) * cot)))(jnp.asarray(x))
    else:
        dx, ddense = jax.jit(jax.grad(lambda a, c: jnp.sum(ref(a, c) * cot), argnums=(0, 1)))(
            jnp.asarray(x), jnp.asarray(dense))
        np.testing.assert_allclose(np.asarray(ddense, np.float64), want_dd, rtol=1e-6, atol=1e-6)
    assert rel_err(dx, want_dx) < 1e-5


def test_reference_pair_order_is_row_major_upper_triangle():
    x = np.zeros((1, 4, 4), np.float32)
    x[0] = np.eye(4) * np.array([1, 2, 3, 4])[:, None]
    x[0, :, 0] += 1.0  # <x_i, x_j> = 1 for i != j ... plus diagonal terms make pairs distinct below
    x[0, 1, 0] = 2.0
    out = np.asarray(pairwise_interaction_reference(jnp.asarray(x)))[0]
    g = x[0] @ x[0].T
    np.testing.assert_allclose(out, [g[0, 1], g[0, 2], g[0, 3], g[1, 2], g[1, 3], g[2, 3]])


def test_dispatch_on_cpu():
    rng = np.random.default_rng(0)
    x, dense = _inputs(rng, 2, 5, 8, 3)
    auto = pairwise_interaction(jnp.asarray(x), jnp.asarray(dense))
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(pairwise_interaction_reference(jnp.asarray(x),
                                                                                               jnp.asarray(dense))))
    if not any(dev.platform == "gpu" for dev in jax.devices()):
        with pytest.raises(RuntimeError, match="jax-triton"):
            pairwise_interaction(jnp.asarray(x), backend="triton")


# --------------------------------------------------------------------------- interpreter


def _check(b, f, d, dd, dtype, mode, seed):
    from genrec_jax.kernels.interaction import interaction_triton

    rng = np.random.default_rng(seed)
    x, dense = _inputs(rng, b, f, d, dd, dtype)
    xj = jnp.asarray(x).astype(dtype)
    dj = None if dense is None else jnp.asarray(dense).astype(dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    got = jax.jit(lambda a, c: interaction_triton(a, c, launch_mode=mode))(xj, dj)
    assert got.shape == (b, dd + f * (f - 1) // 2) and got.dtype == jnp.dtype(dtype)
    assert rel_err(got, loop64(x, dense)) < tol
    cot = rng.standard_normal(got.shape).astype(np.float32)
    cot_seen = np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32))
    want_dx, want_dd = grads64_numpy(x, dense, cot_seen)

    def loss(a, c):
        return jnp.sum(interaction_triton(a, c, launch_mode=mode).astype(jnp.float32) * cot)

    if dense is None:
        dx = jax.jit(jax.grad(lambda a: loss(a, None)))(xj)
    else:
        dx, ddense = jax.jit(jax.grad(loss, argnums=(0, 1)))(xj, dj)
        assert ddense.dtype == jnp.dtype(dtype) and rel_err(ddense, want_dd) < tol
    assert dx.dtype == jnp.dtype(dtype)
    assert rel_err(dx, want_dx) < tol


@needs_interpreter
@pytest.mark.parametrize("b,f,d,dd", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpreter_forward_backward_match_float64(b, f, d, dd, dtype):
    _check(b, f, d, dd, dtype, "interpret", seed=b * 31 + f * 7 + d + dd)


@needs_triton
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_compiles_for_sm90(kind):
    from genrec_jax.kernels import interaction as ki
    from genrec_jax.kernels import launch

    kernel = ki.autotuned(kind, 128)
    cfg = launch.autotune_configs(kernel)[1]
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    sig = {"X": "*bf16", "DENSE": "*bf16", "num_rows": "i32", "OUT": "*bf16", "DOUT": "*bf16", "DX": "*bf16"}
    sig = {n: sig[n] for n in launch.base_jit(kernel).arg_names if n in sig}
    meta = dict(F=128, D=128, DD=13, PRECISION="tf32", BLOCK_F=128, BLOCK_D=64, **cfg)
    if kind == "fwd":
        meta.update(HAS_DENSE=True, BLOCK_DD=16)
    compiled = launch.compile_for_target(kernel, sig, meta, num_warps=warps, num_stages=stages)
    assert compiled.metadata.shared <= 232448
    assert "mma" in compiled.asm["ptx"]


@needs_triton
@pytest.mark.parametrize("f", [16, 50])
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_whole_row_configs_compile_for_sm90(kind, f):
    """The pipelined whole-row path (BLOCK_I >= F, BLOCK_D = D = 128) in every configuration
    that takes it compiles to sm_90 within shared memory."""
    from genrec_jax.kernels import interaction as ki
    from genrec_jax.kernels import launch

    block_f = ki._block_f(f)
    kernel = ki.autotuned(kind, block_f)
    sig = {"X": "*bf16", "DENSE": "*bf16", "num_rows": "i32", "OUT": "*bf16", "DOUT": "*bf16", "DX": "*bf16"}
    sig = {n: sig[n] for n in launch.base_jit(kernel).arg_names if n in sig}
    whole = [c for c in launch.autotune_configs(kernel) if c["BLOCK_I"] >= f and c["ROW_STAGES"] > 1]
    assert whole
    for cfg in whole:
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        meta = dict(F=f, D=128, DD=13 if kind == "fwd" else 0, PRECISION="tf32", BLOCK_F=block_f,
                    BLOCK_D=ki._block_d(128, block_f), **cfg)
        if kind == "fwd":
            meta.update(HAS_DENSE=True, BLOCK_DD=16)
        compiled = launch.compile_for_target(kernel, sig, meta, num_warps=warps, num_stages=stages)
        assert compiled.metadata.shared <= 232448
        assert "mma" in compiled.asm["ptx"]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,f,d,dd", SHAPES + [(257, 128, 128, 13), (1000, 16, 128, 0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_matches_float64(b, f, d, dd, dtype):
    _check(b, f, d, dd, dtype, "jax_triton", seed=b + f + d)


@pytest.mark.gpu
@needs_gpu
def test_gpu_poisoned_outputs_all_written():
    pytest.importorskip("torch")
    _check(33, 50, 40, 7, jnp.bfloat16, "torch", seed=3)

"""MoE grouped matmul: reference op, Triton kernels (interpreter / GPU), dispatch.

* always run: ``grouped_matmul_reference`` and its gradients against float64 NumPy loops;
* Triton interpreter (needs triton + CPU torch; CI installs neither): forward, input and
  weight gradients through the jax wrapper with NaN-poisoned outputs, experts without
  tiles, odd K / N;
* ``@pytest.mark.gpu``: the same through jax-triton.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.ops.grouped_matmul import grouped_matmul, grouped_matmul_reference
from tests.kernels.markers import needs_gpu, needs_interpreter

SHAPES = [  # tiles per expert (sorted), M, K, N
    ([2, 0, 3, 1], 16, 24, 40),  # an expert without tiles: its weight gradient is zero
    ([1, 1], 32, 16, 16),
    ([0, 4, 0], 16, 33, 17),  # odd K and N: masked loads and stores
]


def inputs(counts, m, k, n, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    e, t = len(counts), sum(counts)
    te = np.repeat(np.arange(e), counts).astype(np.int32)
    x = rng.standard_normal((t, m, k)).astype(np.float32)
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    g = rng.standard_normal((t, m, n)).astype(np.float32)  # an upstream gradient
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(te), g


def loops64(x, w, te, g):
    """Output, dx and dw of sum(out * g), in float64 loops over tiles."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    out = np.stack([x[i] @ w[e] for i, e in enumerate(np.asarray(te))])
    dx = np.stack([g[i] @ w[e].T for i, e in enumerate(np.asarray(te))])
    dw = np.zeros_like(w)
    for i, e in enumerate(np.asarray(te)):
        dw[e] += x[i].T @ g[i]
    return out, dx, dw


def check(fn, counts, m, k, n, seed, dtype, tol):
    x, w, te, g = inputs(counts, m, k, n, seed, dtype)
    out, vjp = jax.vjp(lambda a, b: fn(a, b, te), x, w)
    dx, dw = vjp(jnp.asarray(g, out.dtype))
    want = loops64(x.astype(jnp.float32), w.astype(jnp.float32), te, np.asarray(jnp.asarray(g, out.dtype), np.float32))
    for name, got, ref in zip(("out", "dx", "dw"), (out, dx, dw), want):
        got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
        assert got.shape == ref.shape, name
        assert np.all(np.isfinite(got)), f"{name}: NaN/inf (an element never written?)"
        scale = max(1.0, float(np.max(np.abs(ref))))
        err = float(np.max(np.abs(got - ref))) / scale
        assert err <= tol, f"{name}: max error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("counts,m,k,n", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_against_float64(counts, m, k, n, seed):
    check(grouped_matmul_reference, counts, m, k, n, seed, jnp.float32, 1e-5)


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="checks the CPU dispatch")
def test_dispatch_on_cpu_is_the_reference():
    x, w, te, _ = inputs([1, 2], 16, 8, 8, 0)
    np.testing.assert_array_equal(grouped_matmul(x, w, te), grouped_matmul_reference(x, w, te))
    with pytest.raises(RuntimeError, match="triton"):
        grouped_matmul(x, w, te, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("counts,m,k,n", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kernels_in_the_interpreter(counts, m, k, n, dtype, tol):
    from genrec_jax.kernels.grouped_matmul import grouped_matmul_triton

    check(lambda a, b, te: grouped_matmul_triton(a, b, te, launch_mode="interpret"), counts, m, k, n, 3, dtype, tol)


def test_rows_per_tile_must_be_a_power_of_two():
    pytest.importorskip("triton")
    from genrec_jax.kernels.grouped_matmul import grouped_matmul_triton

    x, w, te, _ = inputs([1], 24, 8, 8, 0)
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul_triton(x, w, te, launch_mode="interpret")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("counts,m,k,n", SHAPES + [([17, 17, 18, 16, 17, 17, 17, 17], 512, 512, 1024)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kernels_on_the_gpu(counts, m, k, n, dtype, tol):
    from genrec_jax.kernels.grouped_matmul import grouped_matmul_triton

    check(jax.jit(lambda a, b, te: grouped_matmul_triton(a, b, te)), counts, m, k, n, 4, dtype, tol)

"""sharding.per_shard: ops XLA cannot partition (Triton kernels) run once per shard.

The always-run tests use a plain jnp function that acts row by row and head by head, so
they check the plumbing (local shapes, values, gradients of replicated inputs, no gather of
the operands) without a GPU. The interpreter test runs the real attention kernels per shard
on the 8 simulated CPU devices (needs triton and CPU torch; CI installs neither).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from genrec_jax.config import MeshConfig
from genrec_jax.sharding import make_mesh, per_shard
from tests.kernels.markers import needs_interpreter

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

DIMS = dict(q=("batch", None, "heads", None), lengths=("batch",), table=(None,))


def rowwise(q, lengths, table):
    """Depends on each row's own length and on a replicated table: a stand-in for a kernel."""
    scale = (lengths.astype(q.dtype) + 1.0)[:, None, None, None]
    return jnp.tanh(q) * scale + q * jnp.sum(table**2)


def inputs(b=8, n=6, h=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32),
            jnp.asarray(rng.integers(1, n + 1, b), jnp.int32),
            jnp.asarray(rng.normal(size=(5,)), jnp.float32))


def run(mesh, q, lengths, table, seen):
    def fn(q, lengths, table):
        seen.append(q.shape)
        return rowwise(q, lengths, table)

    def loss(q, table):
        out = per_shard(fn, dict(q=q, lengths=lengths, table=table), DIMS, DIMS["q"])
        return jnp.sum(out * jnp.cos(out)), out

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return f(q, table), None
    if q.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
        q = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
    with jax.set_mesh(mesh):
        hlo = f.lower(q, table).compile().as_text()
        return f(q, table), hlo


@needs8
@pytest.mark.parametrize("axes,local", [
    (dict(data=4, tensor=2), (2, 6, 2, 3)),
    (dict(data=2, fsdp=2, tensor=2), (2, 6, 2, 3)),
    (dict(data=8), (1, 6, 4, 3)),
    (dict(tensor=2, expert=4), (2, 6, 2, 3)),  # the batch is split over expert too
], ids=lambda a: str(a))
def test_per_shard_runs_locally_and_matches_the_global_function(axes, local):
    full = dict(data=1, fsdp=1, tensor=1, expert=1)
    full.update(axes)
    mesh = make_mesh(MeshConfig(**full))
    q, lengths, table = inputs()
    seen_ref, seen = [], []
    ((ref_loss, ref_out), ref_grads), _ = run(None, q, lengths, table, seen_ref)
    ((got_loss, got_out), got_grads), hlo = run(mesh, q, lengths, table, seen)
    assert seen_ref[0] == q.shape
    assert seen and all(s == local for s in seen), seen
    np.testing.assert_allclose(got_out, ref_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # The operands stay where they are: nothing is gathered onto every device.
    assert "all-gather" not in hlo


@needs8
def test_per_shard_keeps_an_indivisible_batch_whole_and_still_splits_heads():
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    q, lengths, table = inputs(b=6)  # 6 rows do not split over 4
    seen = []
    ((_, out), _), _ = run(mesh, q, lengths, table, seen)
    assert all(s == (6, 6, 2, 3) for s in seen), seen
    np.testing.assert_allclose(out, rowwise(q, lengths, table), rtol=1e-6, atol=1e-6)


def test_per_shard_without_a_mesh_calls_the_function_as_is():
    q, lengths, table = inputs()
    seen = []
    out = per_shard(lambda **a: seen.append(a["q"].shape) or rowwise(**a),
                    dict(q=q, lengths=lengths, table=table), DIMS, DIMS["q"])
    assert seen == [q.shape]
    np.testing.assert_allclose(out, rowwise(q, lengths, table))


@needs8
@needs_interpreter
def test_triton_attention_per_shard_matches_the_reference(monkeypatch):
    """The attention dispatch with backend='triton' under an 8-device mesh: the kernels (Triton
    interpreter) run per shard and forward and gradients (q, k, v, both bias tables) equal
    the pure-JAX reference on the full batch."""
    from genrec_jax.ops import hstu_attention as ops

    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setenv("GENREC_TRITON_LAUNCH", "interpret")
    b, n, h, d = 8, 16, 2, 8
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray(rng.integers(1, n + 1, b), jnp.int32)
    ts = jnp.asarray(np.cumsum(rng.integers(1, 5000, (b, n)), 1), jnp.int32)
    qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], 1)
    pos = jnp.asarray(rng.normal(size=(n + 1,)) * 0.3, jnp.float32)
    tb = jnp.asarray(rng.normal(size=(16,)) * 0.3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)

    def loss(backend):
        def f(q, k, v, pos, tb):
            out = ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, time_bias=tb, timestamps=ts,
                                     query_timestamps=qts, backend=backend)
            return jnp.sum(out * w)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))

    ref_val, ref_grads = loss("xla")(q, k, v, pos, tb)
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    sh = NamedSharding(mesh, P("data", None, "tensor", None))
    with jax.set_mesh(mesh):
        val, grads = loss("triton")(*(jax.device_put(x, sh) for x in (q, k, v)), pos, tb)
    assert np.isfinite(val)
    np.testing.assert_allclose(val, ref_val, rtol=1e-4)
    for name, g, r in zip(("q", "k", "v", "pos_bias", "time_bias"), grads, ref_grads):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)

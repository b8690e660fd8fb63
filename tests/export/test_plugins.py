"""The jax2onnx adjustments in genrec_jax.export.plugins, on minimal functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from genrec_jax.export.graphs import GraphDef, TensorSpec
from genrec_jax.export.onnx_export import to_onnx_model
from genrec_jax.export.parity import session


def _run(fn, inputs, outputs, feeds):
    g = GraphDef("t", fn, inputs, outputs, {})
    proto = to_onnx_model(g)
    sess = session(proto.SerializeToString())
    return proto, sess.run(None, feeds), [np.asarray(x) for x in jax.jit(fn)(*feeds.values())]


def test_concatenate_with_symbolic_axes_keeps_its_length():
    """[B, L] ++ [B, M] is [B, L + M]: a size read back from it must be L + M."""

    def fn(a, b):
        c = jnp.concatenate([a, b], axis=1)
        return (jnp.zeros_like(a[:, :1]) + c.shape[1] + jnp.arange(a.shape[1])[None, :],)

    feeds = {"a": np.zeros((2, 3), np.int32), "b": np.zeros((2, 4), np.int32)}
    _, got, want = _run(fn, [TensorSpec("a", ("B", "L"), "int32"), TensorSpec("b", ("B", "M"), "int32")],
                        [TensorSpec("y", ("B", "L"), "int32")], feeds)
    assert np.array_equal(got[0], want[0])


def test_full_and_arange_with_symbolic_sizes():
    def fn(x):
        return (jnp.full(x.shape, 3, jnp.int32) + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :],)

    feeds = {"x": np.zeros((2, 5), np.int32)}
    _, got, want = _run(fn, [TensorSpec("x", ("B", "L"), "int32")], [TensorSpec("y", ("B", "L"), "int32")], feeds)
    assert np.array_equal(got[0], want[0])


def test_constant_in_bounds_scatter_has_no_nonzero():
    def fn(ts, prev):
        return (ts.at[:, 0].set(ts[:, 0] - prev),)

    feeds = {"ts": np.arange(6, dtype=np.int32).reshape(2, 3), "prev": np.array([1, 2], np.int32)}
    proto, got, want = _run(fn, [TensorSpec("ts", ("B", "L"), "int32"), TensorSpec("prev", ("B",), "int32")],
                            [TensorSpec("y", ("B", "L"), "int32")], feeds)
    assert np.array_equal(got[0], want[0])
    assert "NonZero" not in {n.op_type for n in proto.graph.node}


def test_int_clip_and_einsum_lower_to_trt_friendly_ops():
    def fn(x, w):
        i = jnp.clip(x.astype(jnp.int32), 0, 3)
        return (jnp.einsum("...d,nd->...n", x, w) + i[:, :1].astype(jnp.float32),)

    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32) * 3,
             "w": np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)}
    proto, got, want = _run(fn, [TensorSpec("x", ("B", 4), "float32"), TensorSpec("w", (5, 4), "float32")],
                            [TensorSpec("y", ("B", 5), "float32")], feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    ops = {n.op_type for n in proto.graph.node}
    assert "Clip" not in ops and "Einsum" not in ops


def test_fp16_matmul_with_fp32_accumulation_is_typed_fp32():
    def fn(a, b):
        return (jnp.einsum("bqd,bkd->bqk", a, b, preferred_element_type=jnp.float32) * 0.5,)

    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 3, 4)).astype(np.float16),
             "b": rng.standard_normal((2, 5, 4)).astype(np.float16)}
    proto, got, want = _run(fn, [TensorSpec("a", ("B", 3, 4), "float16"), TensorSpec("b", ("B", 5, 4), "float16")],
                            [TensorSpec("y", ("B", 3, 5), "float32")], feeds)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    np.testing.assert_allclose(got[0], want[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("idx,ok", [([[0]], True), ([[1]], False), ([[-1]], False)])
def test_scatter_bounds_rule(idx, ok):
    from jax.export import symbolic_shape

    from genrec_jax.export.plugins import scatter_statically_in_bounds

    class Spec:  # x.at[:, i].set(v) on [B, L]
        update_window_dims = (0,)
        inserted_window_dims = (1,)
        scatter_dims_to_operand_dims = (1,)

    b, l_ = symbolic_shape("B, L")
    assert scatter_statically_in_bounds(np.array(idx), (b, l_), (b,), Spec) is ok
    assert scatter_statically_in_bounds(np.array([[3]]), (2, 4), (2,), Spec) is True
    assert scatter_statically_in_bounds(np.array([[4]]), (2, 4), (2,), Spec) is False

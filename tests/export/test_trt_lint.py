"""TensorRT lint: the exported graphs pass; each rule catches what it is for."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from genrec_jax.export import trt_ops
from genrec_jax.export.trt_lint import lint_model, main


def test_exported_graphs_pass_the_lint(tiny_export, decoder_export):
    out, _, _ = tiny_export
    files = sorted(out.glob("*.onnx")) + sorted(decoder_export.out_dir.glob("*.onnx"))
    assert len(files) >= 8
    for f in files:
        errors = [i for i in lint_model(f) if i.severity == "error"]
        assert not errors, (f.name, [str(e) for e in errors])
    assert main([str(out)]) == 0


def _model(nodes, inputs, outputs, inits=(), opset=20):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, et, shape):
    return helper.make_tensor_value_info(name, et, shape)


def _rules(model):
    return {(i.rule, i.op) for i in lint_model(model) if i.severity == "error"}


def test_flags_data_dependent_shapes():
    m = _model([helper.make_node("NonZero", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, ["B"])],
               [_vi("y", TensorProto.INT64, [1, None])])
    assert ("data-dependent", "NonZero") in _rules(m)
    # a Reshape whose target shape is read from an input's values
    m = _model([helper.make_node("Cast", ["s"], ["s64"], to=TensorProto.INT64),
                helper.make_node("Reshape", ["x", "s64"], ["y"])],
               [_vi("x", TensorProto.FLOAT, [6]), _vi("s", TensorProto.INT32, [2])],
               [_vi("y", TensorProto.FLOAT, None)])
    assert ("data-dependent", "Reshape") in _rules(m)


def test_reshape_from_input_shapes_is_fine():
    m = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
               [_vi("x", TensorProto.FLOAT, ["B", 3])], [_vi("y", TensorProto.FLOAT, ["B", 3])])
    assert _rules(m) == set()


def test_flags_int64_io_and_unsupported_types():
    m = _model([helper.make_node("Clip", ["x"], ["y"])], [_vi("x", TensorProto.INT64, ["B"])],
               [_vi("y", TensorProto.INT64, ["B"])])
    rules = _rules(m)
    assert ("io", "") in rules and ("dtype", "Clip") in rules


def test_flags_topk_limits_and_opset_and_custom_ops():
    k = onnx.numpy_helper.from_array(np.array([5000], np.int64), "k")
    m = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [_vi("x", TensorProto.FLOAT, ["B", 6000])],
               [_vi("v", TensorProto.FLOAT, ["B", 5000]), _vi("i", TensorProto.INT64, ["B", 5000])], [k])
    assert ("attribute", "TopK") in _rules(m)
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, ["B"])],
               [_vi("y", TensorProto.FLOAT, ["B"])], opset=23)
    assert ("opset", "") in _rules(m)
    m = _model([helper.make_node("Unique", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, ["B"])],
               [_vi("y", TensorProto.FLOAT, [None])])
    assert ("op", "Unique") in _rules(m)


def test_unnamed_dynamic_axis_is_an_error():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [None])],
               [_vi("y", TensorProto.FLOAT, [None])])
    assert ("io", "") in _rules(m)


def test_table_names_its_source_and_covers_the_graph_ops():
    assert "onnx-tensorrt" in trt_ops.SOURCE and trt_ops.MAX_OPSET == 20
    for op in ("MatMul", "Gather", "If", "TopK", "ScatterND", "Where", "Gelu", "Range", "Einsum"):
        assert trt_ops.is_supported(op)
    assert not trt_ops.is_supported("NonZero") or "NonZero" in trt_ops.DATA_DEPENDENT_SHAPE_OPS


@pytest.mark.parametrize("op", sorted(trt_ops.UNSUPPORTED)[:3])
def test_unsupported_table_entries_are_not_supported(op):
    assert not trt_ops.is_supported(op)

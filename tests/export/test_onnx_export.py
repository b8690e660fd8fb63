"""python -m genrec_jax.export on the tiny preset's checkpoint: files, manifest, checks, parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from genrec_jax.export import parity
from genrec_jax.export.manifest import check_against_onnx, onnx_io, read_manifest


def test_cli_exports_and_its_checks_pass(tiny_export):
    out, rc, text = tiny_export
    assert rc == 0, text
    for f in ("encoder.onnx", "encoder.fp16.onnx", "ranker.onnx", "ranker.fp16.onnx", "manifest.json",
              "parity.json", "lint.json", "README_serving.md", "side/item_table.npy", "side/item_ids.json",
              "triton/encoder/config.pbtxt", "triton/ranker/config.pbtxt", "triton/README.md"):
        assert (out / f).exists(), f"{f} missing from the export"
    assert "decode_step: skipped" in text  # the tiny preset has no semantic-ID decoder
    linted = json.loads((out / "lint.json").read_text())
    assert sorted(linted) == ["encoder.fp16.onnx", "encoder.onnx", "ranker.fp16.onnx", "ranker.onnx"]


def test_cli_lints_only_what_it_wrote(tiny_run, tmp_path, capsys):
    """Exporting into a folder that already holds other .onnx files: those are not ours to judge."""
    from genrec_jax.export.cli import main

    (tmp_path / "stray.onnx").write_bytes(b"not an ONNX file")
    rc = main(["--checkpoint", str(tiny_run), "--out", str(tmp_path), "--graphs", "encoder", "--no-fp16",
               "--parity-users", "4"])
    assert rc == 0, capsys.readouterr().out
    assert sorted(json.loads((tmp_path / "lint.json").read_text())) == ["encoder.onnx"]


def test_manifest_lists_exactly_what_the_graphs_contain(tiny_export):
    out, _, _ = tiny_export
    m = read_manifest(out)
    for name, entry in m.graphs.items():
        for prec in ("fp32", "fp16"):
            proto = onnx.load(str(out / entry.path(prec)))
            ins, outs = onnx_io(proto)
            want_in, want_out = entry.io(prec)
            assert check_against_onnx(want_in, ins) == [], (name, prec)
            assert check_against_onnx(want_out, outs) == [], (name, prec)
    assert m.model["num_items"] == 120 and m.model["unknown_action"] == m.model["num_actions"]
    table = np.load(out / m.side_files["item_table"]["file"])
    assert table.shape == (121, m.model["embed_dim"])


@pytest.mark.parametrize("name", ["encoder", "ranker"])
def test_graphs_pass_checker_with_full_shape_inference_at_pinned_opset(tiny_export, name):
    out, _, _ = tiny_export
    for f in (f"{name}.onnx", f"{name}.fp16.onnx"):
        proto = onnx.load(str(out / f))
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        assert {i.domain: i.version for i in inferred.opset_import}[""] == 20
        # batch and length stay dynamic, by name
        dims = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        assert {"B", "L"} <= dims


def test_fp16_graphs_compute_in_float16(tiny_export):
    out, _, _ = tiny_export
    proto = onnx.load(str(out / "encoder.fp16.onnx"))
    kinds = {i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    outs = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert outs["states"] == onnx.TensorProto.FLOAT16 and outs["retrieval_logits"] == onnx.TensorProto.FLOAT


def test_parity_report_within_tolerance_on_random_and_real_inputs(tiny_export):
    out, _, _ = tiny_export
    reports = json.loads((out / "parity.json").read_text())
    seen = {(r["graph"], r["precision"], r["inputs"]) for r in reports}
    for g in ("encoder", "ranker"):
        for p in ("fp32", "fp16"):
            assert {(g, p, "random"), (g, p, "real")} <= seen
    bad = [r for r in reports if r["max_error"] > {"fp32": 1e-4, "fp16": 1e-2}[r["precision"]]]
    assert not bad, bad


def test_dynamic_axes_match_jax_at_other_sizes(tiny_export, tiny_graphs, tiny_trained):
    """Batch, history length and candidate count are dynamic: other sizes still match."""
    out, _, _ = tiny_export
    sizes = {"B": 1, "L": 5, "M": 3}
    for name, g in tiny_graphs.items():
        feeds = parity.random_feeds(g, tiny_trained.model, sizes, seed=sizes["B"])
        reps = parity.check_graph(g, out / f"{name}.onnx", [("random", feeds)])
        reps += parity.check_graph(g, out / f"{name}.fp16.onnx", [("random", feeds)], precision="fp16")
        for r in reps:
            assert r.ok(), (name, r.precision, r.errors)


def test_relative_error_definition():
    w = np.array([1.0, -2.0, 0.0, -np.inf])
    assert parity.relative_error(w, w) == 0.0
    assert parity.relative_error(w + np.array([0.0, 0.02, 0.0, 0.0]), w) == pytest.approx(0.01)
    assert parity.relative_error(np.array([1.0, -2.0, 0.0, 0.0]), w) == float("inf")  # -inf moved
    assert parity.relative_error(np.array([1, 2]), np.array([1, 3])) == float("inf")  # ids must be equal

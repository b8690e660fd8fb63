"""The TensorRT engine builder: everything that runs without TensorRT, and (skipped here) with it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from genrec_jax.export.build_engine import (BuildOptions, build_engine, calibration_data, check_engine, main,
                                            parse_dim_overrides, profile_shapes)
from genrec_jax.export.manifest import read_manifest

NO_TRT = "TensorRT cannot be installed on any machine here (no tensorrt Python package)"
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_span_the_manifest_axes(tiny_export):
    out, _, _ = tiny_export
    m = read_manifest(out)
    shapes = profile_shapes(m, "ranker")
    b, l_, mm = m.dims["B"], m.dims["L"], m.dims["M"]
    assert shapes["items"] == ((b["min"], l_["min"]), (b["opt"], l_["opt"]), (b["max"], l_["max"]))
    assert shapes["candidates"][2] == (b["max"], mm["max"])
    assert shapes["lengths"] == ((b["min"],), (b["opt"],), (b["max"],))
    over = profile_shapes(m, "encoder", parse_dim_overrides(["B=2,8,32"]))
    assert over["items"][2][0] == 32 and over["items"][0][0] == 2


def test_dim_overrides_are_validated():
    assert parse_dim_overrides(["L=16"]) == {"L": {"min": 16, "opt": 16, "max": 16}}
    with pytest.raises(ValueError):
        parse_dim_overrides(["B=8,4,16"])


def test_calibration_batches_are_real_histories_shaped_like_the_inputs(tiny_export, tiny_run):
    out, _, _ = tiny_export
    m = read_manifest(out)
    data = calibration_data(out, "ranker", tiny_run, users=40, batch_size=8)
    assert len(data) == 5 and data.batch_size == 8
    ins, _ = m.graphs["ranker"].io()
    for batch in data:
        assert list(batch) == [t["name"] for t in ins]
        for t in ins:
            assert batch[t["name"]].dtype == np.dtype(t["dtype"])
        assert (batch["lengths"] >= 1).all() and (batch["candidates"] >= 1).all()


def test_decode_step_calibration_records_the_beam_search_inputs(decoder_export, tiny_run):
    data = calibration_data(decoder_export.out_dir, "decode_step", tiny_run, users=16, batch_size=8)
    levels = [int(b["level"][0]) for b in data]
    assert levels == [0, 1, 2, 0, 1, 2]


def test_cli_prints_profiles_without_tensorrt(tiny_export, capsys):
    out, _, _ = tiny_export
    assert main(["--export-dir", str(out), "--print-shapes"]) == 0
    assert "items: min [1, 1]" in capsys.readouterr().out


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_cli_explains_missing_tensorrt(tiny_export, capsys):
    out, _, _ = tiny_export
    assert main(["--export-dir", str(out), "--graphs", "encoder"]) == 3
    assert "pip install tensorrt" in capsys.readouterr().err
    assert main(["--export-dir", str(out), "--precision", "int8"]) == 2  # int8 needs calibration data


def test_engine_parity_check_with_a_stand_in_runner(tiny_export, tiny_graphs, tiny_trained):
    """check_engine compares any feeds -> outputs callable with ONNX Runtime: an ORT
    session standing in for the engine gives zero error."""
    from genrec_jax.export import parity

    out, _, _ = tiny_export
    g = tiny_graphs["encoder"]
    sess = parity.session(out / "encoder.onnx")
    names = [o.name for o in sess.get_outputs()]
    feeds = parity.random_feeds(g, tiny_trained.model, {"B": 2, "L": 16}, seed=0)
    reports = check_engine(lambda f: dict(zip(names, sess.run(names, f))), out / "encoder.onnx", [("random", feeds)],
                           graph="encoder", precision="fp32")
    assert reports[0].max_error == 0.0 and reports[0].ok()


@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_and_matches_onnxruntime(tiny_export, tmp_path, precision):  # pragma: no cover - needs TRT
    from genrec_jax.export.build_engine import EngineRunner, engine_feeds

    out, _, _ = tiny_export
    m = read_manifest(out)
    for g in m.graphs:
        plan = build_engine(out / m.graphs[g].file, tmp_path / f"{g}.plan", profile_shapes(m, g),
                            BuildOptions(precision=precision, timing_cache=tmp_path / "timing.cache"))
        for r in check_engine(EngineRunner(plan), out / m.graphs[g].file, engine_feeds(out, g, m, None),
                              graph=g, precision=precision):
            assert r.ok(), (g, r.errors)
    assert (tmp_path / "timing.cache").stat().st_size > 0


@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_int8_engine_calibrates_on_real_histories(tiny_export, tiny_run, tmp_path):  # pragma: no cover
    out, _, _ = tiny_export
    assert main(["--export-dir", str(out), "--graphs", "encoder", "--precision", "int8", "--calib-checkpoint",
                 str(tiny_run), "--calib-users", "64", "--calib-batch", "4", "--out", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "encoder.int8.calib").exists()

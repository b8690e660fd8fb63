"""Triton model repository: valid config.pbtxt per graph, and the BLS recommend model."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from genrec_jax.export.manifest import read_manifest
from genrec_jax.export.triton_repo import check_config, parse_pbtxt, write_repository


def test_configs_match_the_graphs(tiny_export):
    out, _, _ = tiny_export
    repo = out / "triton"
    m = read_manifest(out)
    for name, entry in m.graphs.items():
        cfg = parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert cfg["name"] == name and cfg["platform"] == "tensorrt_plan"
        assert cfg["max_batch_size"] == m.dims["B"]["max"]
        assert "max_queue_delay_microseconds" in cfg["dynamic_batching"]
        ins, outs = entry.io()
        assert check_config(cfg, ins, outs) == []
        assert (repo / name / "1").is_dir()
    assert "## Generative recommendation" in (repo / "README.md").read_text()


def test_decoder_repository_has_unbatched_decode_step_and_recommend(decoder_export, tmp_path):
    repo = write_repository(decoder_export.out_dir, tmp_path / "repo", backend="onnxruntime")
    m = read_manifest(decoder_export.out_dir)
    dec = parse_pbtxt((repo / "decode_step" / "config.pbtxt").read_text())
    assert dec["max_batch_size"] == 0 and "dynamic_batching" not in dec
    ins, outs = m.graphs["decode_step"].io()
    assert check_config(dec, ins, outs) == []
    assert (repo / "decode_step" / "1" / "model.onnx").exists()
    rec = parse_pbtxt((repo / "recommend" / "config.pbtxt").read_text())
    assert rec["backend"] == "python"
    for f in ("model.py", "genrec_beam.py", "trie.safetensors", "decode_inputs.json"):
        assert (repo / "recommend" / "1" / f).exists()


def test_check_config_reports_mismatches():
    cfg = parse_pbtxt('name: "x" platform: "tensorrt_plan" max_batch_size: 4 '
                      'input [ { name: "a" data_type: TYPE_INT32 dims: [ -1 ] } ] '
                      'output [ { name: "b" data_type: TYPE_FP16 dims: [ 3 ] } ]')
    problems = check_config(cfg, [{"name": "a", "shape": ["B", "L"], "dtype": "int32"}],
                            [{"name": "b", "shape": ["B", 3], "dtype": "float32"}])
    assert len(problems) == 1 and "TYPE_FP16" in problems[0]


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


def _fake_pb_utils(client):
    """A stand-in for triton_python_backend_utils whose BLS calls run ONNX Runtime."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor

    class InferenceRequest:
        def __init__(self, model_name=None, inputs=(), requested_output_names=()):
            self.model, self.inputs, self.outputs = model_name, inputs, list(requested_output_names)

        def exec(self):
            res = client.run(self.model, {t.name(): t.as_numpy() for t in self.inputs})
            return types.SimpleNamespace(has_error=lambda: False,
                                         outputs=[_Tensor(n, res[n]) for n in self.outputs])

    pb.InferenceRequest = InferenceRequest
    pb.get_output_tensor_by_name = lambda resp, n: next(t for t in resp.outputs if t.name() == n)
    pb.get_input_tensor_by_name = lambda req, n: next(t for t in req.inputs if t.name() == n)
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(outputs=output_tensors, error=error)
    pb.TritonError = RuntimeError
    pb.TritonModelException = RuntimeError
    return pb


@pytest.mark.parametrize("repeat_aware", [False, True])
def test_recommend_bls_model_runs_the_client_beam_search(decoder_export, real_batch, tmp_path, monkeypatch,
                                                         repeat_aware):
    from genrec_jax.export.ort_client import OnnxRecommender

    export_dir = decoder_export.out_dir
    if repeat_aware:  # the same graphs with repeat offsets in the manifest (a history_bias decoder's export)
        import shutil

        export_dir = tmp_path / "export"
        shutil.copytree(decoder_export.out_dir, export_dir)
        manifest = json.loads((export_dir / "manifest.json").read_text())
        manifest["model"].update(repeat_bias=[0.5, -1.0, -25.0], repeat_mode="item")
        (export_dir / "manifest.json").write_text(json.dumps(manifest))
    repo = write_repository(export_dir, tmp_path / "repo", k=5, beam_width=8)
    assert (repo / "recommend" / "1" / "repeat_bias.json").exists() == repeat_aware
    client = OnnxRecommender(export_dir)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils(client))
    monkeypatch.syspath_prepend(str(repo / "recommend" / "1"))
    sys.modules.pop("genrec_beam", None)
    ns: dict = {"__file__": str(repo / "recommend" / "1" / "model.py")}
    exec(compile((repo / "recommend" / "1" / "model.py").read_text(), "model.py", "exec"), ns)
    model = ns["TritonPythonModel"]()
    cfg = parse_pbtxt((repo / "recommend" / "config.pbtxt").read_text())
    params = {p["key"]: p["value"] for p in cfg["parameters"]}
    model.initialize({"model_config": json.dumps({"parameters": params})})
    hist = {k: real_batch[k][:6] for k in ("items", "actions", "timestamps", "query_timestamps", "lengths")}
    req = types.SimpleNamespace(inputs=[_Tensor(k, v) for k, v in hist.items()])
    (resp,) = model.execute([req])
    assert resp.error is None, resp.error
    items = next(t for t in resp.outputs if t.name() == "items").as_numpy()
    want, _ = client.recommend(hist, k=5, beam_width=8)
    assert np.array_equal(items, want)
    if repeat_aware:
        assert not any(np.isin(items[r], hist["items"][r][hist["items"][r] > 0]).any() for r in range(6))


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_cli(tiny_export, tmp_path, backend):
    from genrec_jax.export.triton_repo import main

    out, _, _ = tiny_export
    assert main([str(out), "--out", str(tmp_path / backend), "--backend", backend]) == 0
    cfg = parse_pbtxt((tmp_path / backend / "encoder" / "config.pbtxt").read_text())
    assert cfg["platform"] == {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[backend]

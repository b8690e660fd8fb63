"""Triton Inference Server model repository for an export directory.

    python -m genrec_jax.export.triton_repo EXPORT_DIR [--out REPO] [--backend tensorrt|onnxruntime]

writes::

    REPO/encoder/config.pbtxt        platform tensorrt_plan, dynamic batching (batch = dim 0)
    REPO/encoder/1/                  model.plan goes here (build_engine.py --triton-repo REPO)
    REPO/ranker/config.pbtxt         dynamic batching
    REPO/decode_step/config.pbtxt    max_batch_size 0: called by the beam-search driver,
                                     which already batches B x W hypotheses
    REPO/recommend/config.pbtxt      Python backend (BLS): encoder + beam search over
    REPO/recommend/1/model.py        decode_step with the trie (ort_client.beam_search)
    REPO/recommend/1/genrec_beam.py
    REPO/recommend/1/trie.safetensors
    REPO/README.md                   the serving team's guide (README_serving.md)

Every graph tensor is batch-first, so Triton can batch requests along dim 0; requests are
only batched together when their other dims agree, so clients should pad histories to
one length (the manifest's ``max_len``) -- lengths say what is real.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from genrec_jax.export.manifest import Manifest, read_manifest

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
BATCHED_GRAPHS = ("encoder", "ranker")  # dynamic batching along dim 0
HISTORY = ("items", "actions", "timestamps", "query_timestamps", "lengths")


def _dims(shape: list, batched: bool) -> list[int]:
    dims = [-1 if isinstance(d, str) else int(d) for d in shape]
    return dims[1:] if batched else dims


def _tensor_block(tensors: list[dict], batched: bool) -> str:
    rows = []
    for t in tensors:
        dims = _dims(t["shape"], batched)
        reshape = ""
        if batched and not dims:  # a per-row scalar: Triton needs a non-empty dims list
            dims, reshape = [1], " reshape: { shape: [ ] }"
        rows.append(f'  {{ name: "{t["name"]}" data_type: {TRITON_TYPES[t["dtype"]]} '
                    f'dims: [ {", ".join(map(str, dims))} ]{reshape} }}')
    return "[\n" + ",\n".join(rows) + "\n]"


def model_config(name: str, inputs: list[dict], outputs: list[dict], *, max_batch_size: int, backend: str,
                 preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int = 2000,
                 instances: int = 1, kind: str = "KIND_GPU", fp16: bool = False) -> str:
    """config.pbtxt text of one graph."""
    batched = max_batch_size > 0
    lines = [f'name: "{name}"']
    if backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    elif backend == "onnxruntime":
        lines.append('platform: "onnxruntime_onnx"')
    else:
        raise ValueError(f"backend must be 'tensorrt' or 'onnxruntime', got {backend!r}")
    lines.append(f"max_batch_size: {max_batch_size}")
    lines.append(f"input {_tensor_block(inputs, batched)}")
    lines.append(f"output {_tensor_block(outputs, batched)}")
    if batched:
        pref = sorted({b for b in (preferred_batch_sizes or []) if 0 < b <= max_batch_size})
        body = [f"  preferred_batch_size: [ {', '.join(map(str, pref))} ]"] if pref else []
        body.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
        lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
    lines.append(f"instance_group [\n  {{ count: {instances} kind: {kind} }}\n]")
    if backend == "onnxruntime" and kind == "KIND_GPU":
        mode = "FP16" if fp16 else "FP32"
        lines.append("optimization { execution_accelerators { gpu_execution_accelerator : [ "
                     f'{{ name : "tensorrt" parameters {{ key: "precision_mode" value: "{mode}" }} }} ] }} }}')
    return "\n".join(lines) + "\n"


def recommend_config(manifest: Manifest, *, k: int, beam_width: int, max_batch_size: int, precision: str) -> str:
    enc_in, _ = manifest.graphs["encoder"].io(precision)
    inputs = [t for t in enc_in if t["name"] in HISTORY]
    outputs = [{"name": "items", "shape": ["B", k], "dtype": "int32"},
               {"name": "scores", "shape": ["B", k], "dtype": "float32"}]
    return "\n".join([
        'name: "recommend"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        f"input {_tensor_block(inputs, True)}",
        f"output {_tensor_block(outputs, True)}",
        "dynamic_batching { max_queue_delay_microseconds: 2000 }",
        "instance_group [\n  { count: 1 kind: KIND_CPU }\n]",
        "parameters [",
        f'  {{ key: "k" value: {{ string_value: "{k}" }} }},',
        f'  {{ key: "beam_width" value: {{ string_value: "{beam_width}" }} }},',
        f'  {{ key: "precision" value: {{ string_value: "{precision}" }} }}',
        "]",
    ]) + "\n"


RECOMMEND_MODEL_PY = '''"""Triton Python-backend (BLS) model: encoder -> trie-constrained beam search over decode_step.

Generated by genrec_jax.export.triton_repo. The search itself is genrec_beam.beam_search
(a copy of genrec_jax/export/ort_client.py), the code the export's parity tests run
against the JAX engine through ONNX Runtime; here each decode step is a BLS call.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from genrec_beam import TrieArrays, beam_search, prefix_sizes, repeat_inputs

HISTORY = ("items", "actions", "timestamps", "query_timestamps", "lengths")


def _bls(model, feeds, outputs):
    req = pb_utils.InferenceRequest(model_name=model,
                                    inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in feeds.items()],
                                    requested_output_names=list(outputs))
    resp = req.exec()
    if resp.has_error():
        raise pb_utils.TritonModelException(f"{model}: {resp.error().message()}")
    return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs}


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        params = json.loads(args["model_config"]).get("parameters", {})
        self.k = int(params["k"]["string_value"])
        self.beam_width = int(params["beam_width"]["string_value"])
        with open(os.path.join(here, "decode_inputs.json")) as f:
            self.decode_inputs = json.load(f)
        self.trie = TrieArrays(os.path.join(here, "trie.safetensors"))
        self.repeat = None  # repeat-aware decoder: {"bias": [L], "mode": str}, item codes, prefix sizes
        if os.path.exists(os.path.join(here, "repeat_bias.json")):
            with open(os.path.join(here, "repeat_bias.json")) as f:
                spec = json.load(f)
            codes = np.load(os.path.join(here, "item_codes.npy"))
            self.repeat = (spec, codes, prefix_sizes(codes) if spec["mode"] == "item" else None)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                hist = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in HISTORY}
                enc = _bls("encoder", hist, ["cross_k", "cross_v", "cross_valid"])
                history = None
                if self.repeat is not None:
                    spec, codes, sizes = self.repeat
                    history = repeat_inputs(spec["bias"], spec["mode"], codes, hist["items"], sizes)
                items, scores = beam_search(
                    lambda feeds: _bls("decode_step", feeds, ["logits", "new_self_k", "new_self_v"]),
                    self.trie, enc, self.decode_inputs, k=self.k, beam_width=self.beam_width, history=history)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("items", items.astype(np.int32)),
                    pb_utils.Tensor("scores", scores.astype(np.float32))]))
            except Exception as e:  # one failing request must not fail the batch
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
'''


def write_repository(export_dir: str | Path, repo_dir: str | Path | None = None, *, backend: str = "tensorrt",
                     precision: str = "fp32", k: int | None = None, beam_width: int | None = None,
                     instances: int = 1) -> Path:
    """Write the model repository for ``export_dir`` (default ``export_dir/triton``)."""
    import json

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    repo = Path(repo_dir) if repo_dir else export_dir / "triton"
    repo.mkdir(parents=True, exist_ok=True)
    max_b = int(manifest.dims["B"]["max"])
    opt_b = int(manifest.dims["B"]["opt"])
    for name, entry in manifest.graphs.items():
        ins, outs = entry.io(precision)
        batched = name in BATCHED_GRAPHS
        text = model_config(name, ins, outs, max_batch_size=max_b if batched else 0, backend=backend,
                            preferred_batch_sizes=[opt_b, max_b], instances=instances, fp16=precision == "fp16")
        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(text)
        if backend == "onnxruntime":
            shutil.copyfile(export_dir / entry.path(precision), d / "1" / "model.onnx")
    if "decode_step" in manifest.graphs and "trie" in manifest.side_files:
        w = beam_width or int(manifest.dims.get("W", {"max": 16})["max"])
        kk = min(k or w, w)
        d = repo / "recommend"
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(recommend_config(manifest, k=kk, beam_width=w, max_batch_size=max_b,
                                                         precision=precision))
        (d / "1" / "model.py").write_text(RECOMMEND_MODEL_PY)
        shutil.copyfile(Path(__file__).with_name("ort_client.py"), d / "1" / "genrec_beam.py")
        shutil.copyfile(export_dir / manifest.side_files["trie"]["file"], d / "1" / "trie.safetensors")
        if manifest.model.get("repeat_bias") is not None:
            shutil.copyfile(export_dir / manifest.side_files["item_codes"]["file"], d / "1" / "item_codes.npy")
            (d / "1" / "repeat_bias.json").write_text(json.dumps({
                "bias": manifest.model["repeat_bias"], "mode": manifest.model.get("repeat_mode", "prefix")}))
        dec_in, _ = manifest.graphs["decode_step"].io(precision)
        (d / "1" / "decode_inputs.json").write_text(json.dumps({t["name"]: t for t in dec_in}, indent=1))
    from genrec_jax.export.serving_readme import render_readme

    (repo / "README.md").write_text(render_readme(manifest, export_dir=export_dir, backend=backend))
    return repo


# --------------------------------------------------------------------------- validation


def parse_pbtxt(text: str) -> dict:
    """Parse a config.pbtxt into nested dicts/lists (a protobuf text-format subset: messages,
    repeated fields, scalars) -- enough to check what ``model_config`` writes without
    tritonclient's protobuf classes."""
    import re

    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            return message("}")
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            try:
                return float(tok)
            except ValueError:
                return tok  # enum

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            if key in out:
                if not isinstance(out[key], list) or not isinstance(v, list):
                    out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [v]
                else:
                    out[key] += v
            else:
                out[key] = v
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return message(None)


def check_config(cfg: dict, inputs: list[dict], outputs: list[dict]) -> list[str]:
    """Problems of a parsed config.pbtxt against the graph's tensors (empty = valid)."""
    problems = []
    for key in ("name", "max_batch_size", "input", "output"):
        if key not in cfg:
            problems.append(f"missing {key}")
    if "platform" not in cfg and "backend" not in cfg:
        problems.append("neither platform nor backend")
    if problems:
        return problems
    batched = cfg["max_batch_size"] > 0
    for kind, tensors in (("input", inputs), ("output", outputs)):
        got = {t["name"]: t for t in cfg[kind]}
        for t in tensors:
            c = got.get(t["name"])
            if c is None:
                problems.append(f"{kind} {t['name']} missing")
                continue
            if c["data_type"] != TRITON_TYPES[t["dtype"]]:
                problems.append(f"{kind} {t['name']}: {c['data_type']} for {t['dtype']}")
            want = _dims(t["shape"], batched) or [1]
            if c["dims"] != want:
                problems.append(f"{kind} {t['name']}: dims {c['dims']}, graph says {want}")
            if batched and not (isinstance(t["shape"][0], str) and t["shape"][0] == "B"):
                problems.append(f"{kind} {t['name']}: batched model but dim 0 is {t['shape'][0]!r}, not the batch")
        if len(got) != len(tensors):
            problems.append(f"{kind}: {len(got)} tensors in the config, {len(tensors)} in the graph")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genrec_jax.export.triton_repo",
                                 description="Write a Triton model repository for an export directory.")
    ap.add_argument("export_dir")
    ap.add_argument("--out", default=None, help="repository directory (default EXPORT_DIR/triton)")
    ap.add_argument("--backend", choices=("tensorrt", "onnxruntime"), default="tensorrt")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--k", type=int, default=None, help="items the recommend model returns")
    ap.add_argument("--beam-width", type=int, default=None)
    ap.add_argument("--instances", type=int, default=1)
    args = ap.parse_args(argv)
    repo = write_repository(args.export_dir, args.out, backend=args.backend, precision=args.precision, k=args.k,
                            beam_width=args.beam_width, instances=args.instances)
    print(f"model repository: {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

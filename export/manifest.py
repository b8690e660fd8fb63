"""``manifest.json``: every exported graph's inputs and outputs (name, shape, dtype), the axis
ranges, the side files, and the facts a serving client needs (catalogue size, action ids,
semantic-ID code sizes). The serving team builds, configures and calls everything from it.

Layout (``version`` 1)::

    {"version": 1, "format": "genrec-jax-export",
     "model": {...},                       # arch, embed_dim, num_items, max_len, tasks, ...
     "opset": 20, "tensorrt_target": "10.x",
     "dims": {"B": {"min", "opt", "max"}, ...},
     "graphs": {"encoder": {"file", "fp16_file", "doc", "inputs": [...], "outputs": [...],
                            "fp16_inputs", "fp16_outputs", "dims": [...]}, ...},
     "skipped": {"ranker": "why"},
     "side_files": {"item_table": {"file", "shape", "dtype", "doc"}, ...}}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT = "genrec-jax-export"
VERSION = 1

ONNX_TO_NUMPY = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                 10: "float16", 11: "float64", 16: "bfloat16"}


@dataclasses.dataclass
class GraphEntry:
    file: str
    inputs: list[dict]
    outputs: list[dict]
    dims: list[str]
    doc: str = ""
    fp16_file: str | None = None
    fp16_inputs: list[dict] | None = None
    fp16_outputs: list[dict] | None = None

    def io(self, precision: str = "fp32") -> tuple[list[dict], list[dict]]:
        if precision == "fp16":
            if self.fp16_file is None:
                raise KeyError("no fp16 variant was exported")
            return self.fp16_inputs or self.inputs, self.fp16_outputs or self.outputs
        return self.inputs, self.outputs

    def path(self, precision: str = "fp32") -> str:
        if precision == "fp16":
            if self.fp16_file is None:
                raise KeyError("no fp16 variant was exported")
            return self.fp16_file
        return self.file


@dataclasses.dataclass
class Manifest:
    model: dict[str, Any]
    opset: int
    dims: dict[str, dict[str, int]]
    graphs: dict[str, GraphEntry]
    side_files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    tensorrt_target: str = "10.x"
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = VERSION
    format: str = FORMAT

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["graphs"] = {k: {kk: vv for kk, vv in dataclasses.asdict(v).items() if vv is not None}
                       for k, v in self.graphs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest (format={d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"manifest version {d['version']} is newer than this reader ({VERSION})")
        d = dict(d)
        d["graphs"] = {k: GraphEntry(**v) for k, v in d["graphs"].items()}
        return cls(**d)

    def write(self, out_dir: str | Path) -> Path:
        p = Path(out_dir) / MANIFEST_NAME
        p.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return p

    def shape_of(self, graph: str, tensor: str, sizes: dict[str, int], precision: str = "fp32") -> tuple[int, ...]:
        """Concrete shape of one input/output for the given symbolic sizes."""
        ins, outs = self.graphs[graph].io(precision)
        for t in ins + outs:
            if t["name"] == tensor:
                return tuple(sizes[d] if isinstance(d, str) else int(d) for d in t["shape"])
        raise KeyError(f"{graph} has no tensor {tensor!r}")


def read_manifest(out_dir: str | Path) -> Manifest:
    p = Path(out_dir) / MANIFEST_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p} missing: export first with "
                                "`python -m genrec_jax.export --checkpoint RUN --out DIR`")
    return Manifest.from_json(json.loads(p.read_text()))


def side_file_entry(path: Path, root: Path, doc: str) -> dict[str, Any]:
    """Manifest entry of a side file (.npy: shape and dtype read from its header)."""
    entry: dict[str, Any] = {"file": str(path.relative_to(root)), "doc": doc}
    if path.suffix == ".npy":
        a = np.load(path, mmap_mode="r")
        entry.update(shape=list(a.shape), dtype=str(a.dtype))
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        entry["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in load_file(str(path)).items()}
    return entry


def onnx_io(model) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of an ONNX ModelProto as manifest dicts (symbolic dims as names)."""

    def one(vi) -> dict:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": vi.name, "shape": shape, "dtype": ONNX_TO_NUMPY.get(tt.elem_type, str(tt.elem_type))}

    inits = {i.name for i in model.graph.initializer}
    return [one(v) for v in model.graph.input if v.name not in inits], [one(v) for v in model.graph.output]


def check_against_onnx(entry_io: list[dict], onnx_io_list: list[dict]) -> list[str]:
    """Differences between the manifest's tensors and the ONNX file's (empty = consistent)."""
    problems = []
    got = {t["name"]: t for t in onnx_io_list}
    if [t["name"] for t in entry_io] != [t["name"] for t in onnx_io_list]:
        problems.append(f"names differ: manifest {[t['name'] for t in entry_io]} vs onnx {list(got)}")
    for t in entry_io:
        o = got.get(t["name"])
        if o is None:
            continue
        if [str(x) for x in t["shape"]] != [str(x) for x in o["shape"]]:
            problems.append(f"{t['name']}: shape {t['shape']} in the manifest, {o['shape']} in the graph")
        if t["dtype"] != o["dtype"]:
            problems.append(f"{t['name']}: dtype {t['dtype']} in the manifest, {o['dtype']} in the graph")
    return problems

"""Export a trained checkpoint to ONNX: graphs (fp32 + fp16), side files and the manifest.

    python -m genrec_jax.export --checkpoint runs/tiny --out export/tiny

The graphs are traced from the model by jax2onnx (see ``graphs.py`` for what each one
computes) at a pinned opset (default 20: TensorRT 10.0's ONNX parser reads opsets 9..20;
later 10.x releases read newer ones too). After conversion every graph is cleaned of
stale intermediate shape annotations, re-shape-inferred in strict mode and passed through
``onnx.checker`` with ``full_check=True``; its inputs and outputs are compared with the
declared specs, so the manifest is exactly what the files contain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from genrec_jax.export import plugins
from genrec_jax.export.graphs import (ExportLimits, GraphDef, abstract_inputs, build_graphs, prepare_model,
                                     unknown_action_id)
from genrec_jax.export.manifest import GraphEntry, Manifest, check_against_onnx, onnx_io, side_file_entry

DEFAULT_OPSET = 20
TENSORRT_TARGET = "10.x"
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weights than this keep them in a .data file


class ExportError(RuntimeError):
    """A graph could not be exported, or the exported graph is not what was declared."""


# --------------------------------------------------------------------------- one graph


def to_onnx_model(graph: GraphDef, opset: int = DEFAULT_OPSET,
                  metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Trace ``graph`` with jax2onnx and return the checked, shape-inferred ModelProto."""
    from jax2onnx import to_onnx

    plugins.install()

    def convert():
        # onnx_ir warns about every shape-constant value it leaves untyped; finalize()
        # re-infers all intermediate types anyway.
        with _quiet("onnx_ir.serde"):
            return to_onnx(graph.fn, abstract_inputs(graph), opset=opset, model_name=graph.name,
                           input_names=[t.name for t in graph.inputs], output_names=[t.name for t in graph.outputs],
                           return_mode="proto")

    try:
        try:
            proto = convert()
        except Exception as e:
            if "plugin" not in str(e).lower():
                raise
            plugins.import_all()  # a primitive outside the core plugin set: load them all, retry
            proto = convert()
    except Exception as e:  # name the graph: jax2onnx errors come from deep inside the trace
        raise ExportError(f"jax2onnx could not convert the {graph.name} graph: {type(e).__name__}: {e}") from e
    return finalize(proto, graph, metadata)


@contextlib.contextmanager
def _quiet(logger_name: str):
    lg = logging.getLogger(logger_name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def finalize(proto: onnx.ModelProto, graph: GraphDef, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Drop the converter's intermediate shape annotations (jax2onnx 0.17 stamps some values
    of symbolic-shape graphs with wrong static shapes, which ONNX Runtime trusts when it
    plans buffers), re-infer them strictly, check the model, and compare its I/O with the
    declared specs."""
    del proto.graph.value_info[:]
    proto.doc_string = graph.doc
    onnx.helper.set_model_props(proto, {"genrec_jax.graph": graph.name, **(metadata or {})})
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    check_model(proto)
    ins, outs = onnx_io(proto)
    want_in = [t.to_json() for t in graph.inputs]
    want_out = [t.to_json() for t in graph.outputs]
    problems = check_against_onnx(want_in, ins) + check_against_onnx(want_out, outs)
    if problems:
        raise ExportError(f"{graph.name}: the exported graph differs from its declared I/O: " + "; ".join(problems))
    return proto


def check_model(proto: onnx.ModelProto) -> None:
    """``onnx.checker`` with full shape inference (large models are checked from a file)."""
    if proto.ByteSize() < (1 << 31) - (1 << 20):
        onnx.checker.check_model(proto, full_check=True)


def save_model(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)
    return path


# --------------------------------------------------------------------------- side files


def write_side_files(model, item_ids: list[str] | None, out: Path) -> dict[str, dict[str, Any]]:
    """Item table, external item ids and (with a decoder) the item codes and the trie."""
    side = out / "side"
    side.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    table = np.asarray(model.item_table(), np.float32)
    np.save(side / "item_table.npy", table)
    entries["item_table"] = side_file_entry(
        side / "item_table.npy", out,
        "retrieval item vectors [N + 1, D] (row 0 = padding); score = user_embedding . row * logit_scale")
    if item_ids is not None:
        (side / "item_ids.json").write_text(json.dumps(list(item_ids)))
        entries["item_ids"] = {"file": "side/item_ids.json",
                               "doc": "external id of each internal item id (0 = padding)",
                               "count": len(item_ids)}
    if getattr(model, "decoder", None) is not None:
        from genrec_jax.semantic_ids.trie import Trie

        codes = np.asarray(model.item_codes[...], np.int32)
        np.save(side / "item_codes.npy", codes)
        entries["item_codes"] = side_file_entry(side / "item_codes.npy", out,
                                                "semantic ID of every item id [N + 1, levels] (row 0 = padding)")
        trie = Trie.from_item_codes(codes, model.decoder.code_sizes)
        save_trie(trie, side / "trie.safetensors")
        entries["trie"] = side_file_entry(side / "trie.safetensors", out,
                                          "valid code paths (CSR per level; dense masks where small), see README")
        entries["trie"].update(code_sizes=list(trie.code_sizes), max_fanout=list(trie.max_fanout),
                               num_nodes=list(trie.num_nodes))
    return entries


def save_trie(trie, path: Path) -> None:
    """The trie's arrays: child_ptr_<d>, child_code_<d>, leaf_item, dense_mask_<d> (uint8)."""
    from safetensors.numpy import save_file

    tensors = {"leaf_item": np.asarray(trie.leaf_item, np.int32)}
    for d in range(trie.num_levels):
        tensors[f"child_ptr_{d}"] = np.asarray(trie.child_ptr[d], np.int32)
        tensors[f"child_code_{d}"] = np.asarray(trie.child_code[d], np.int32)
        if trie.dense_mask[d] is not None:
            tensors[f"dense_mask_{d}"] = np.asarray(trie.dense_mask[d], np.uint8)
    save_file(tensors, str(path), metadata={"code_sizes": json.dumps(list(trie.code_sizes)),
                                           "max_fanout": json.dumps(list(trie.max_fanout)),
                                           "num_nodes": json.dumps(list(trie.num_nodes))})


# --------------------------------------------------------------------------- whole export


def model_facts(model, info: dict | None = None) -> dict[str, Any]:
    cfg = model.cfg
    facts: dict[str, Any] = {
        "arch": cfg.arch, "embed_dim": cfg.embed_dim, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "num_items": model.num_items, "num_actions": model.num_actions, "unknown_action": unknown_action_id(model),
        "action_names": list(model.action_names), "max_len": model.max_len, "l2_norm": cfg.l2_norm,
        "logit_scale": float(model.logit_scale()),
        "timestamps": "int32 seconds relative to each row's first history event",
    }
    if model.tasks is not None:
        facts["tasks"] = list(model.tasks.tasks)
    if getattr(model, "decoder", None) is not None:
        facts["code_sizes"] = list(model.decoder.code_sizes)
        facts["num_levels"] = model.decoder.num_levels
        if getattr(model.decoder, "repeat_bias", None) is not None:
            # Repeat-aware decoding: the beam-search driver adds repeat_bias[t] to the level-t
            # logits of codes that continue a beam's prefix into a history item (side/item_codes.npy).
            facts["repeat_bias"] = [float(x) for x in np.asarray(model.decoder.repeat_offsets())]
            facts["repeat_mode"] = model.decoder.cfg.history_bias_mode
    if info:
        facts["dataset"] = info.get("name")
    return facts


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    manifest: Manifest
    graphs: dict[str, GraphDef]  # fp32 graph definitions (JAX functions), for parity checks
    graphs_fp16: dict[str, GraphDef]
    seconds: float


def export_model(model, out_dir: str | Path, *, info: dict | None = None, item_ids: list[str] | None = None,
                 opset: int = DEFAULT_OPSET, fp16: bool = True, limits: ExportLimits = ExportLimits(),
                 checkpoint: dict | None = None, only: tuple[str, ...] | None = None,
                 log=print) -> ExportResult:
    """Export every graph the model supports (``only``: a subset) into ``out_dir``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"genrec_jax.opset": str(opset)}
    if checkpoint:
        meta.update({f"genrec_jax.{k}": str(v) for k, v in checkpoint.items()})
    variants = {"fp32": prepare_model(model, "float32")}
    if fp16:
        variants["fp16"] = prepare_model(model, "float16")
    defs: dict[str, dict[str, GraphDef]] = {}
    skipped: dict[str, str] = {}
    for prec, m in variants.items():
        graphs, skipped = build_graphs(m, limits)
        defs[prec] = {g.name: g for g in graphs if only is None or g.name in only}
    entries: dict[str, GraphEntry] = {}
    for name, g in defs["fp32"].items():
        t = time.perf_counter()
        proto = to_onnx_model(g, opset, {**meta, "genrec_jax.precision": "fp32"})
        save_model(proto, out / f"{name}.onnx")
        ins, outs = onnx_io(proto)
        entry = GraphEntry(file=f"{name}.onnx", inputs=[t_.to_json() for t_ in g.inputs],
                           outputs=[t_.to_json() for t_ in g.outputs], dims=sorted(_dims_used(g)), doc=g.doc)
        log(f"  {name}.onnx: {len(proto.graph.node)} nodes, {_op_count(proto)} op types "
            f"({time.perf_counter() - t:.1f} s)")
        if "fp16" in defs:
            t = time.perf_counter()
            g16 = defs["fp16"][name]
            p16 = to_onnx_model(g16, opset, {**meta, "genrec_jax.precision": "fp16"})
            save_model(p16, out / f"{name}.fp16.onnx")
            entry.fp16_file = f"{name}.fp16.onnx"
            entry.fp16_inputs = [t_.to_json() for t_ in g16.inputs]
            entry.fp16_outputs = [t_.to_json() for t_ in g16.outputs]
            log(f"  {name}.fp16.onnx ({time.perf_counter() - t:.1f} s)")
        entries[name] = entry
    dims = {}
    for g in defs["fp32"].values():
        dims.update({k: v.to_json() for k, v in g.dims.items() if k in _dims_used(g)})
    side = write_side_files(variants["fp32"], item_ids, out)
    manifest = Manifest(model=model_facts(model, info), opset=opset, dims=dims, graphs=entries, side_files=side,
                        skipped=skipped, tensorrt_target=TENSORRT_TARGET, checkpoint=checkpoint or {})
    manifest.write(out)
    return ExportResult(out, manifest, defs["fp32"], defs.get("fp16", {}), time.perf_counter() - t0)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, **kwargs) -> ExportResult:
    """Load a training run directory (``load_trained``) and export it."""
    from genrec_jax.train.restore import load_trained

    tm = load_trained(checkpoint)
    limits = kwargs.pop("limits", None) or limits_from_config(tm.cfg)
    ck = {"run_dir": str(Path(checkpoint).resolve()), "step": tm.step}
    return export_model(tm.model, out_dir, info=tm.info, item_ids=tm.item_ids, limits=limits, checkpoint=ck, **kwargs)


def limits_from_config(cfg, **overrides) -> ExportLimits:
    """Axis ranges from the run's serve section (largest batch bucket, beam width, candidates)."""
    s = cfg.serve
    max_b = max(s.batch_buckets) if s.batch_buckets else 64
    beam = max(s.beam_width, cfg.model.decoder.beam_width if cfg.model.decoder.enabled else 0)
    lim = ExportLimits(max_batch=max_b, opt_batch=max_b, max_candidates=s.max_candidates,
                       opt_candidates=min(64, s.max_candidates), beam_width=beam, top_k=min(s.max_k, 3839))
    return dataclasses.replace(lim, **overrides)


def _dims_used(g: GraphDef) -> set[str]:
    return {d for t in g.inputs + g.outputs for d in t.shape if isinstance(d, str)}


def _op_count(proto: onnx.ModelProto) -> int:
    return len({n.op_type for n in proto.graph.node})

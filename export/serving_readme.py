"""Render ``README_serving.md`` (the serving team's guide) from a manifest."""

from __future__ import annotations

import json
import string
from pathlib import Path

from genrec_jax.export.manifest import Manifest

TEMPLATE = Path(__file__).with_name("README_serving.md")


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _shape(s: list) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _graph_section(name: str, entry) -> str:
    parts = [f"## `{entry.file}`", "", entry.doc or "", ""]
    for kind, tensors in (("Inputs", entry.inputs), ("Outputs", entry.outputs)):
        parts.append(f"{kind}:")
        parts.append("")
        parts.append(_table(["name", "shape", "dtype", "meaning"],
                            [[f"`{t['name']}`", _shape(t["shape"]), t["dtype"], t.get("doc", "")] for t in tensors]))
        parts.append("")
    if entry.fp16_file:
        diff = [t["name"] for t, t16 in zip(entry.inputs + entry.outputs,
                                            (entry.fp16_inputs or []) + (entry.fp16_outputs or []))
                if t["dtype"] != t16["dtype"]]
        note = f" (float16 tensors there: {', '.join(diff)})" if diff else " (same tensor dtypes)"
        parts.append(f"fp16 variant: `{entry.fp16_file}`{note}.")
    return "\n".join(parts)


BEAM_SECTION = """Items have semantic IDs: a path of $levels codes (codebook sizes $code_sizes),
`side/item_codes.npy` maps item id -> codes and `side/trie.safetensors` holds the valid
paths as a trie in CSR form per level d: node n at depth d owns children
`child_ptr_d[n] .. child_ptr_d[n+1]`, child j has code `child_code_d[j]` and is node j at
depth d+1; at the last level `leaf_item[j]` is the item id (`dense_mask_d` [nodes, K_d]
where small). Per request batch (B rows, W beams, k results, k <= W):

1. Run `encoder.onnx`; keep `cross_k`, `cross_v`, `cross_valid`.
2. `self_k = self_v = zeros [B, layers, W, levels, heads, head_dim]`; `node = prev = 0
   [B, W]`; `score[:, 0] = 0`, `score[:, 1:] = -inf`.
3. For level t = 0 .. $last_level: run `decode_step.onnx` with `prev_codes=prev`,
   `level=[t]` and the caches; take `logits[..., :K_t]`, `logp = log_softmax(logits)`.
   For each beam, its children in the trie give (code, next node); candidate score =
   `score + logp[code]` (-inf for dead beams / empty slots). Keep the best W of the
   W x max_fanout candidates (the best k at the last level; ties to the lower index),
   set `prev` = their codes, `node` = their child nodes, and gather `new_self_k/v`
   along the W axis (axis 2) by each survivor's parent beam.
4. After the last level `node` holds item ids (0 where score is -inf).

`export/ort_client.py` (`beam_search`) is this algorithm in NumPy; the Triton
`recommend` model runs that same file. The export tests check that it returns the JAX
engine's top-k items."""


def _verification(export_dir: Path | None) -> str:
    if export_dir is None:
        return "Run `python -m genrec_jax.export ...` to produce `parity.json` and `lint.json`."
    lines = []
    p = export_dir / "parity.json"
    if p.exists():
        rows = []
        for r in json.loads(p.read_text()):
            rows.append([r["graph"], r["precision"], r["inputs"], f"{r['max_error']:.2e}", f"{r['tolerance']:.0e}",
                         "ok" if r["ok"] else "FAIL"])
        lines.append("ONNX Runtime vs the JAX model (max relative error = max|onnx - jax| / max|jax| per output):")
        lines.append("")
        lines.append(_table(["graph", "precision", "inputs", "max rel. error", "tolerance", ""], rows))
    p = export_dir / "lint.json"
    if p.exists():
        issues = json.loads(p.read_text())
        n = sum(1 for v in issues.values() for i in v if i["severity"] == "error")
        lines.append("")
        lines.append(f"TensorRT lint: {len(issues)} graphs, {n} errors.")
    return "\n".join(lines) or "No parity or lint report in the export directory."


def render_readme(manifest: Manifest, *, export_dir: str | Path | None = None, backend: str = "tensorrt") -> str:
    m = manifest.model
    export_dir = Path(export_dir) if export_dir is not None else None
    model_rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)] for k, v in m.items()]
    files = [[f"`{e.file}`", f"`{e.fp16_file}`" if e.fp16_file else "", e.doc] for e in manifest.graphs.values()]
    files += [[f"`{s['file']}`", "", s.get("doc", "")] for s in manifest.side_files.values()]
    for name, why in manifest.skipped.items():
        files.append([f"({name}.onnx not exported)", "", why])
    dims = [[f"`{k}`", v["min"], v["opt"], v["max"]] for k, v in manifest.dims.items()]
    if "code_sizes" in m:
        beam = string.Template(BEAM_SECTION).substitute(levels=m["num_levels"], code_sizes=m["code_sizes"],
                                                        last_level=m["num_levels"] - 1)
    else:
        beam = "This model has no semantic-ID decoder, so there is no `decode_step.onnx`; use retrieval."
    trtexec = _trtexec_example(manifest)
    text = string.Template(TEMPLATE.read_text()).substitute(
        checkpoint=manifest.checkpoint.get("run_dir", "?"), step=manifest.checkpoint.get("step", "?"),
        model_table=_table(["model", "value"], model_rows),
        files_table=_table(["fp32", "fp16", "what"], files),
        opset=manifest.opset, trt_target=manifest.tensorrt_target, num_items=m["num_items"],
        max_action=m["num_actions"] - 1, actions=", ".join(m.get("action_names", [])) or "-",
        unknown_action=m["unknown_action"], max_len=m["max_len"],
        dims_table=_table(["axis", "min", "opt", "max"], dims),
        graph_sections="\n\n".join(_graph_section(n, e) for n, e in manifest.graphs.items()),
        logit_scale=f"{m['logit_scale']:g}", tasks=", ".join(m.get("tasks", [])) or "-", beam_section=beam,
        export_dir=str(export_dir) if export_dir else "EXPORT_DIR", trtexec=trtexec,
        verification=_verification(export_dir),
    )
    return text


def _trtexec_example(manifest: Manifest) -> str:
    from genrec_jax.export.build_engine import profile_shapes

    entry = manifest.graphs["encoder"]
    shapes = profile_shapes(manifest, "encoder")
    fmt = lambda i: ",".join(f"{n}:{'x'.join(map(str, s[i])) or '1'}" for n, s in shapes.items())  # noqa: E731
    return (f"```\ntrtexec --onnx={entry.file} --fp16 --saveEngine=encoder.plan \\\n"
            f"    --minShapes={fmt(0)} \\\n    --optShapes={fmt(1)} \\\n    --maxShapes={fmt(2)}\n```")

"""TensorRT lint: will TensorRT 10's ONNX parser build these graphs, without dynamic-shape traps?

Checks, per graph (and recursively inside If / Loop bodies):

* ``checker``: ``onnx.checker`` with ``full_check`` and strict shape inference pass;
* ``opset``: the default-domain opset is within what the target parser reads
  (``trt_ops.MIN_OPSET..MAX_OPSET``); no custom domains, no model-local functions;
* ``op``: every op type is in TensorRT's supported-operator table (``trt_ops``);
* ``dtype``: the tensor type the table constrains (usually input 0) is one it lists for
  the op -- so an int64 tensor reaching an op without INT64 support fails here;
* ``attribute``: the table's attribute restrictions (TopK ``sorted``=1 and a constant
  K < 3840, ScatterND ``reduction``=none, Dropout not training, LayerNormalization with one
  output, constant ``axes``/``axis``/``depth`` inputs, If branches of equal output rank);
* ``data-dependent``: no op whose output shape depends on tensor values (NonZero,
  Unique, ...) and no shape input (Reshape shape, Slice bounds, Range limits, ...)
  computed from input values rather than from input shapes and constants;
* ``io``: graph inputs and outputs are int32 / float / bool (no int64, no double), and
  every dynamic axis has a name (``dim_param``), which the optimization profiles and the
  manifest refer to.

    python -m genrec_jax.export.trt_lint OUT_DIR            # every *.onnx there
    python -m genrec_jax.export.trt_lint a.onnx b.onnx --json lint.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import onnx

from genrec_jax.export import trt_ops

IO_TYPES = {1: "float32", 6: "int32", 9: "bool", 10: "float16", 16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class LintIssue:
    graph: str
    rule: str
    message: str
    node: str = ""
    op: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        where = f" {self.op} node {self.node!r}" if self.node else ""
        return f"[{self.severity}] {self.graph}:{where} {self.rule}: {self.message}"


@dataclasses.dataclass
class _Scope:
    """Types, constness and data-dependence of the tensors visible in one (sub)graph."""

    types: dict[str, int]
    const: set[str]
    dyn_value: set[str]  # value depends on graph input values
    dyn_shape: set[str]  # shape depends on graph input values
    parent: "_Scope | None" = None

    def elem_type(self, name: str) -> int | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.types:
                return s.types[name]
            s = s.parent
        return None

    def has(self, attr: str, name: str) -> bool:
        s: _Scope | None = self
        while s is not None:
            if name in getattr(s, attr):
                return True
            s = s.parent
        return False


def lint_model(model: onnx.ModelProto | str | Path, name: str | None = None, *,
               max_opset: int = trt_ops.MAX_OPSET) -> list[LintIssue]:
    """Every TensorRT incompatibility found in one ONNX model (empty = clean)."""
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).stem
        model = onnx.load(str(model))
    name = name or model.graph.name
    issues: list[LintIssue] = []
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # checker / inference errors carry their own message; lint the rest anyway
        issues.append(LintIssue(name, "checker", f"{type(e).__name__}: {e}"))
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:
            pass
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if not trt_ops.MIN_OPSET <= imp.version <= max_opset:
                issues.append(LintIssue(name, "opset", f"opset {imp.version} is outside what {trt_ops.TARGET} "
                                                       f"parses ({trt_ops.MIN_OPSET}..{max_opset})"))
        else:
            issues.append(LintIssue(name, "opset", f"custom operator domain {imp.domain!r} needs a TensorRT plugin"))
    if len(model.functions):
        issues.append(LintIssue(name, "opset", f"{len(model.functions)} model-local functions: inline them"))
    issues += _lint_io(model.graph, name)
    scope = _Scope(types={}, const=set(), dyn_value=set(), dyn_shape=set())
    _fill_types(model.graph, scope)
    for i in model.graph.input:
        scope.dyn_value.add(i.name)
    issues += _lint_graph(model.graph, scope, name)
    return issues


def _fill_types(graph: onnx.GraphProto, scope: _Scope) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            scope.types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        scope.types[init.name] = init.data_type
        scope.const.add(init.name)


def _lint_io(graph: onnx.GraphProto, name: str) -> list[LintIssue]:
    issues = []
    inits = {i.name for i in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for vi in values:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            if tt.elem_type not in IO_TYPES:
                issues.append(LintIssue(name, "io", f"graph {kind} {vi.name!r} has type "
                                        f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; use int32/float/bool"))
            if not tt.HasField("shape"):
                issues.append(LintIssue(name, "io", f"graph {kind} {vi.name!r} has no shape"))
                continue
            for ax, d in enumerate(tt.shape.dim):
                if not d.dim_param and not d.HasField("dim_value"):
                    issues.append(LintIssue(name, "io", f"graph {kind} {vi.name!r} axis {ax} is dynamic without a "
                                                        "name; name it so profiles can refer to it"))
    return issues


def _attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def _const_int_value(name: str, consts: dict[str, onnx.TensorProto]) -> list[int] | None:
    t = consts.get(name)
    if t is None:
        return None
    return [int(x) for x in onnx.numpy_helper.to_array(t).reshape(-1)]


def _lint_graph(graph: onnx.GraphProto, scope: _Scope, name: str) -> list[LintIssue]:
    issues: list[LintIssue] = []
    consts = {i.name: i for i in graph.initializer}
    for node in graph.node:
        op = node.op_type
        nid = node.name or (node.output[0] if node.output else "")

        def err(rule: str, msg: str, severity: str = "error") -> None:
            issues.append(LintIssue(name, rule, msg, nid, op, severity))

        if node.domain not in ("", "ai.onnx"):
            err("op", f"custom-domain op {node.domain}::{op} needs a TensorRT plugin")
        elif op in trt_ops.UNSUPPORTED:
            err("op", f"{op} is not supported by {trt_ops.TARGET}")
        elif not trt_ops.is_supported(op):
            err("op", f"{op} is not in {trt_ops.TARGET}'s supported-operator table")
        else:
            _check_types(node, scope, err)
        _check_attributes(node, scope, consts, err)
        # constness and data dependence of the outputs
        ins = [i for i in node.input if i]
        if op == "Constant":
            scope.const.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
        elif ins and all(scope.has("const", i) for i in ins) and not op.startswith("Random"):
            scope.const.update(node.output)
        dv = any(scope.has("dyn_value", i) for i in ins)
        ds = any(scope.has("dyn_shape", i) for i in ins)
        if op in trt_ops.DATA_DEPENDENT_SHAPE_OPS:
            err("data-dependent", f"{op}'s output shape depends on input values")
            ds = True
        for idx in trt_ops.SHAPE_INPUTS.get(op, ()):
            if idx < len(node.input) and node.input[idx] and scope.has("dyn_value", node.input[idx]):
                err("data-dependent", f"shape input {idx} ({node.input[idx]!r}) is computed from input values, "
                                      "not from input shapes and constants")
                ds = True
        if op in ("Shape", "Size"):
            dv, ds = ds, False
        for a in node.attribute:  # If / Loop / Scan bodies
            if a.type == onnx.AttributeProto.GRAPH:
                sub = _Scope(types={}, const=set(), dyn_value=set(), dyn_shape=set(), parent=scope)
                _fill_types(a.g, sub)
                for i in a.g.input:
                    sub.dyn_value.add(i.name)
                issues += _lint_graph(a.g, sub, f"{name}/{nid}.{a.name}")
                ds = ds or any(sub.has("dyn_shape", o.name) for o in a.g.output)
                dv = True
        if dv:
            scope.dyn_value.update(node.output)
        if ds:
            scope.dyn_shape.update(node.output)
    return issues


def _check_types(node: onnx.NodeProto, scope: _Scope, err) -> None:
    op = node.op_type
    allowed = trt_ops.supported_types(op)
    which = trt_ops.TYPE_OPERAND.get(op, 0)
    tensor = (node.output[0] if node.output else "") if which < 0 else (
        node.input[which] if which < len(node.input) else "")
    et = scope.elem_type(tensor) if tensor else None
    if et is None:
        if op not in ("If", "Loop", "Scan", "RandomNormal", "RandomUniform"):
            err("dtype", f"type of {tensor!r} unknown after shape inference", "warning")
        return
    tname = trt_ops.ONNX_TYPE_NAMES.get(et, onnx.TensorProto.DataType.Name(et))
    if tname not in allowed:
        err("dtype", f"{tname} {tensor!r}: {op} supports {', '.join(allowed)}")
    if op in ("Cast", "CastLike"):
        to = _attr(node, "to") if op == "Cast" else scope.elem_type(node.input[1])
        to_name = trt_ops.ONNX_TYPE_NAMES.get(to, str(to))
        if to is not None and to_name not in allowed:
            err("dtype", f"cast to {to_name}: {op} supports {', '.join(allowed)}")


def _check_attributes(node: onnx.NodeProto, scope: _Scope, consts: dict, err) -> None:
    op = node.op_type
    for idx in trt_ops.CONSTANT_INPUTS.get(op, ()):
        if idx < len(node.input) and node.input[idx] and not scope.has("const", node.input[idx]):
            err("attribute", f"input {idx} ({node.input[idx]!r}) must be a build-time constant")
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            err("attribute", "TopK needs sorted=1")
        k = _const_int_value(node.input[1], consts) if len(node.input) > 1 else None
        if k is not None and k and k[0] >= trt_ops.TOPK_MAX_K:
            err("attribute", f"TopK K={k[0]} must be < {trt_ops.TOPK_MAX_K}")
    elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
        err("attribute", "ScatterND reduction must be 'none'")
    elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        err("attribute", "only LayerNormalization's first output is supported")
    elif op == "Dropout" and len(node.input) > 2 and node.input[2] and not scope.has("const", node.input[2]):
        err("attribute", "Dropout training_mode must be a constant False")
    elif op == "Einsum":
        eq = _attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        if "..." in eq:
            err("attribute", f"Einsum equation {eq!r}: ellipsis (rejected by TensorRT < 10)", "warning")
        for term in eq.split("->")[0].replace("...", "").split(","):
            if len(set(term.strip())) != len(term.strip()):
                err("attribute", f"Einsum equation {eq!r}: diagonal (repeated index) is not supported")
    elif op == "If":
        branches = [onnx.helper.get_attribute_value(a) for a in node.attribute
                    if a.name in ("then_branch", "else_branch")]
        if len(branches) == 2:
            a, b = branches
            names_a = {o.name for o in a.output}
            if names_a & {o.name for o in b.output}:
                err("attribute", "If branches must name their outputs differently")
            ra = [len(o.type.tensor_type.shape.dim) for o in a.output]
            rb = [len(o.type.tensor_type.shape.dim) for o in b.output]
            if ra != rb:
                err("attribute", f"If branch output ranks differ: {ra} vs {rb}")


def lint_paths(paths: list[Path]) -> dict[str, list[LintIssue]]:
    return {p.name: lint_model(p) for p in paths}


def onnx_files(targets: list[str]) -> list[Path]:
    out: list[Path] = []
    for t in targets:
        p = Path(t)
        out += sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genrec_jax.export.trt_lint",
                                 description="Check exported ONNX graphs against TensorRT 10's ONNX support.")
    ap.add_argument("targets", nargs="+", help="ONNX files or export directories")
    ap.add_argument("--json", default=None, help="write the issues as JSON here")
    ap.add_argument("--max-opset", type=int, default=trt_ops.MAX_OPSET)
    args = ap.parse_args(argv)
    files = onnx_files(args.targets)
    if not files:
        print("no .onnx files found", file=sys.stderr)
        return 2
    report = {p.name: lint_model(p, max_opset=args.max_opset) for p in files}
    errors = 0
    for fname, issues in report.items():
        n_err = sum(i.severity == "error" for i in issues)
        errors += n_err
        print(f"{fname}: {'OK' if not n_err else f'{n_err} error(s)'}"
              + (f", {len(issues) - n_err} warning(s)" if len(issues) > n_err else ""))
        for i in issues:
            print(f"  {i}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: [dataclasses.asdict(i) for i in v] for k, v in report.items()}, indent=2) + "\n")
    print(f"TensorRT table: {trt_ops.SOURCE}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Parity of the exported graphs with the JAX model, in ONNX Runtime.

Error measure (per output): ``max |onnx - jax| / max(max |jax|, 1e-6)`` over the finite
entries, i.e. the largest deviation relative to the output's scale. An element-wise
relative error is meaningless next to zeros (padding rows, ReLU-like outputs), and this
is the measure the tolerances below are stated in. Non-finite entries (-inf padding of
logits) must sit at the same places; integer and bool outputs must be equal, except top-k
item ids, which may differ where two scores tie within the tolerance (checked through
the scores instead).

Tolerances: fp32 graphs vs the fp32 JAX model <= 1e-4; fp16 graphs vs the fp32 JAX model
<= 1e-2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np

from genrec_jax.export.graphs import GraphDef, random_inputs, reference

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Outputs whose exact values are ids chosen by a comparison of nearly equal scores.
TIE_SENSITIVE = {"topk_items"}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| over finite entries; inf when the non-finite entries
    differ in place or sign, or the shapes differ."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
        return 0.0 if np.array_equal(got, want) else float("inf")
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    fin = np.isfinite(w)
    if not np.array_equal(fin, np.isfinite(g)) or not np.array_equal(g[~fin], w[~fin]):
        return float("inf")
    if not fin.any():
        return 0.0
    scale = max(float(np.abs(w[fin]).max()), 1e-6)
    return float(np.abs(g[fin] - w[fin]).max() / scale)


@dataclasses.dataclass
class ParityReport:
    graph: str
    precision: str
    inputs: str  # "random" or "real"
    errors: dict[str, float]  # output -> relative error
    topk_agreement: float | None = None  # share of top-k item ids equal (tie-sensitive)

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    def ok(self) -> bool:
        return self.max_error <= TOLERANCE[self.precision]

    def to_json(self) -> dict:
        return {"graph": self.graph, "precision": self.precision, "inputs": self.inputs,
                "max_error": self.max_error, "tolerance": TOLERANCE[self.precision], "ok": self.ok(),
                "errors": self.errors, "topk_agreement": self.topk_agreement}


def session(path: str | Path | bytes, threads: int = 1):
    """A CPU ONNX Runtime session (``threads`` intra-op threads) of a file or serialized model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def compare(graph: GraphDef, sess, feeds: dict[str, np.ndarray], want: list[np.ndarray], *, precision: str,
            inputs: str, cast_inputs: dict[str, str] | None = None) -> ParityReport:
    """Run ``sess`` on ``feeds`` and compare with the JAX outputs ``want`` (same order)."""
    run_feeds = dict(feeds)
    for name, dt in (cast_inputs or {}).items():
        run_feeds[name] = run_feeds[name].astype(dt)
    got = sess.run([t.name for t in graph.outputs], run_feeds)
    errors, agreement = {}, None
    for spec, g, w in zip(graph.outputs, got, want):
        if spec.name in TIE_SENSITIVE:
            agreement = float(np.mean(np.asarray(g) == np.asarray(w)))
            continue
        errors[spec.name] = relative_error(g, w)
    return ParityReport(graph.name, precision, inputs, errors, agreement)


def check_graph(graph: GraphDef, onnx_path: str | Path, feeds_list: Iterable[tuple[str, dict[str, np.ndarray]]],
                *, precision: str = "fp32", threads: int = 1) -> list[ParityReport]:
    """Parity of one ONNX file with the fp32 JAX graph on each (label, feeds)."""
    sess = session(onnx_path, threads)
    float_inputs = {i.name: ("float16" if i.type == "tensor(float16)" else "float32")
                    for i in sess.get_inputs() if "float" in i.type}
    reports = []
    for label, feeds in feeds_list:
        want = reference(graph, feeds)
        reports.append(compare(graph, sess, feeds, want, precision=precision, inputs=label,
                               cast_inputs=float_inputs))
    return reports


def random_feeds(graph: GraphDef, model, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    return random_inputs(graph, model, sizes, np.random.default_rng(seed))


# --------------------------------------------------------------------------- real inputs


def real_histories(tm, num_users: int = 32, pad_len: int | None = None, split: str = "test") -> dict[str, np.ndarray]:
    """Evaluation batches of the checkpoint's own data set (``collate_eval``), the inputs
    the serving engine sees: the last ``pad_len`` events of ``num_users`` users."""
    from genrec_jax.data.registry import load_dataset
    from genrec_jax.data.sequences import collate_eval, leave_one_out
    from genrec_jax.train.loop import collate_options

    ds = load_dataset(tm.cfg.data)
    es = getattr(leave_one_out(ds.sequences), split)
    rows = np.arange(min(num_users, len(es)))
    batch = collate_eval(es, rows, pad_len or tm.info["max_len"], collate_options(tm.cfg, ds, train=False))
    return batch


def real_feeds(graph: GraphDef, batch: dict[str, np.ndarray], model, seed: int = 0,
               num_candidates: int = 8) -> dict[str, np.ndarray]:
    """Feeds of ``graph`` from a real evaluation batch (candidates: the held-out target plus
    random items, at the request time)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    keep = batch["lengths"] > 0
    for spec in graph.inputs:
        if spec.name in batch:
            feeds[spec.name] = np.asarray(batch[spec.name])[keep].astype(spec.dtype)
    b = int(keep.sum())
    if "candidates" in [t.name for t in graph.inputs]:
        cands = rng.integers(1, model.num_items + 1, (b, num_candidates)).astype(np.int32)
        cands[:, 0] = np.asarray(batch["target_items"])[keep]
        feeds["candidates"] = cands
        lengths = feeds["lengths"]
        feeds["candidate_timestamp"] = feeds["query_timestamps"][np.arange(b), lengths - 1].astype(np.int32)
    missing = [t.name for t in graph.inputs if t.name not in feeds]
    if missing:
        raise ValueError(f"real batch lacks inputs {missing} of the {graph.name} graph")
    return feeds


# --------------------------------------------------------------------------- a whole export


def decode_feeds(dec: GraphDef, enc: GraphDef, enc_feeds: dict[str, np.ndarray], beams: int = 4,
                 label: str = "real") -> list[tuple[str, dict[str, np.ndarray]]]:
    """Feeds of ``decode_step`` for every level along a greedy decode: the cross K/V of the
    encoder on ``enc_feeds`` (JAX), a zero cache at level 0, then the JAX step's own cache."""
    enc_out = dict(zip([t.name for t in enc.outputs], reference(enc, enc_feeds)))
    b = enc_feeds["lengths"].shape[0]
    spec = {t.name: t for t in dec.inputs}
    shape = (b, spec["self_k"].shape[1], beams) + tuple(spec["self_k"].shape[3:])
    self_k = np.zeros(shape, spec["self_k"].dtype)
    self_v = np.zeros(shape, spec["self_v"].dtype)
    prev = np.zeros((b, beams), np.int32)
    levels = spec["self_k"].shape[3]
    out = []
    for level in range(levels):
        feeds = {"prev_codes": prev, "level": np.array([level], np.int32), "self_k": self_k, "self_v": self_v,
                 "cross_k": enc_out["cross_k"], "cross_v": enc_out["cross_v"], "cross_valid": enc_out["cross_valid"]}
        out.append((f"{label}-level{level}", feeds))
        logits, self_k, self_v = reference(dec, feeds)
        # beams = the best `beams` codes of beam 0 (distinct hypotheses, like a beam search)
        order = np.argsort(-np.where(np.isfinite(logits[:, 0]), logits[:, 0], -np.inf), axis=-1)[:, :beams]
        prev = order.astype(np.int32)
    return out


def check_export(result, model, real_batch: dict[str, np.ndarray] | None = None,
                 sizes: dict[str, int] | None = None, threads: int = 1, seed: int = 0) -> list[ParityReport]:
    """Parity of every exported graph and precision (``result``: an ``ExportResult``) on
    random inputs and, with ``real_batch`` (``real_histories``), on real histories."""
    b = int((real_batch["lengths"] > 0).sum()) if real_batch is not None else 3
    sizes = sizes or {"B": b, "L": model.max_len, "M": 8, "W": 4}  # real feeds' shapes: one JAX compile
    reports: list[ParityReport] = []
    enc = result.graphs.get("encoder")
    for name, g in result.graphs.items():
        if name == "decode_step":
            feeds = []
            for lv in range(model.decoder.num_levels):
                f = random_feeds(g, model, sizes, seed + lv)
                f["level"] = np.array([lv], np.int32)
                feeds.append((f"random-level{lv}", f))
            enc_feeds = random_feeds(enc, model, sizes, seed)
            feeds += decode_feeds(g, enc, enc_feeds, sizes["W"], label="random-encoder")
            if real_batch is not None:
                feeds += decode_feeds(g, enc, real_feeds(enc, real_batch, model, seed), sizes["W"])
        else:
            feeds = [("random", random_feeds(g, model, sizes, seed))]
            if real_batch is not None:
                feeds.append(("real", real_feeds(g, real_batch, model, seed)))
        entry = result.manifest.graphs[name]
        reports += check_graph(g, result.out_dir / entry.file, feeds, precision="fp32", threads=threads)
        if entry.fp16_file:
            reports += check_graph(g, result.out_dir / entry.fp16_file, feeds, precision="fp16", threads=threads)
    return reports

"""Build TensorRT engines from an export directory, and check them against ONNX Runtime.

    python -m genrec_jax.export.build_engine --export-dir DIR [--graphs encoder,ranker,decode_step]
        [--precision fp32|fp16|int8] [--timing-cache FILE] [--triton-repo DIR]
        [--calib-checkpoint RUN --calib-users N] [--check]

Per graph: TensorRT's ONNX parser reads ``<graph>.onnx`` (``<graph>.fp16.onnx`` with
``--source fp16``), one optimization profile covers the manifest's axis ranges (min / opt
/ max for B, L, M, W), FP16 and INT8 builder flags follow ``--precision`` (INT8 also
enables FP16 for the layers TensorRT keeps in higher precision, and calibrates on real
histories of the training run through an entropy calibrator, its cache written next to
the plan), and a timing cache file is loaded and saved so rebuilds are fast. The plan is
written to ``DIR/engines/<graph>.<precision>.plan`` (and to ``<repo>/<graph>/1/model.plan``
with ``--triton-repo``). ``--check`` runs the engine and ONNX Runtime on the same random
and real inputs and fails above the parity tolerances (fp32 1e-4, fp16 1e-2; INT8 is
reported, not gated).

Needs the ``tensorrt`` Python package (10.x) and ``cuda-python`` on a machine with an
NVIDIA GPU. Everything that does not need them (profiles, calibration data, the command
line) is importable and tested without.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from genrec_jax.export.manifest import Manifest, read_manifest

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tensorrt as trt

PRECISIONS = ("fp32", "fp16", "int8")
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


class TensorRTUnavailable(RuntimeError):
    """The tensorrt / cuda-python packages (or a GPU) are missing."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F811
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT's Python package is not installed: `pip install tensorrt` (10.x) on a machine with an "
            "NVIDIA GPU and driver, or use trtexec with the shapes printed by --print-shapes") from e
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found; the graphs target TensorRT 10.x")
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise TensorRTUnavailable("cuda-python is not installed: `pip install cuda-python`") from e
    return cudart


# --------------------------------------------------------------------------- profiles


def profile_shapes(manifest: Manifest, graph: str, overrides: dict[str, dict[str, int]] | None = None) -> Shapes:
    """(min, opt, max) shape of every input of ``graph`` from the manifest's axis ranges
    (the same for the fp32 and fp16 variants)."""
    dims = {k: dict(v) for k, v in manifest.dims.items()}
    for k, v in (overrides or {}).items():
        dims.setdefault(k, {}).update(v)
    ins, _ = manifest.graphs[graph].io()
    out: Shapes = {}
    for t in ins:
        triple = []
        for which in ("min", "opt", "max"):
            triple.append(tuple(int(dims[d][which]) if isinstance(d, str) else int(d) for d in t["shape"]))
        out[t["name"]] = (triple[0], triple[1], triple[2])
    return out


def parse_dim_overrides(items: Sequence[str]) -> dict[str, dict[str, int]]:
    """``["B=1,8,64", "L=16"]`` -> {"B": {"min": 1, "opt": 8, "max": 64}, "L": {min/opt/max 16}}."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        name, _, vals = item.partition("=")
        nums = [int(x) for x in vals.split(",") if x]
        if not name or len(nums) not in (1, 3):
            raise ValueError(f"--dim {item!r}: expected NAME=N or NAME=MIN,OPT,MAX")
        mn, opt, mx = (nums * 3)[:3] if len(nums) == 1 else nums
        if not mn <= opt <= mx:
            raise ValueError(f"--dim {item!r}: need min <= opt <= max")
        out[name] = {"min": mn, "opt": opt, "max": mx}
    return out


# --------------------------------------------------------------------------- calibration data


@dataclasses.dataclass
class CalibrationData:
    """Batches of real graph inputs for INT8 calibration (numpy dicts in manifest order)."""

    batches: list[dict[str, np.ndarray]]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.batches[0].values())).shape[0]) if self.batches else 0


def calibration_data(export_dir: str | Path, graph: str, checkpoint: str | Path, *, users: int = 512,
                     batch_size: int = 32, seed: int = 0, pad_len: int | None = None) -> CalibrationData:
    """Real histories of the run's evaluation users, shaped as ``graph``'s inputs.

    encoder / ranker: ``collate_eval`` batches (the ranker's candidates: each user's held-out
    item plus random items at the request time); decode_step: the inputs the beam search
    feeds it, recorded while the ONNX Runtime client runs it on those histories.
    """
    from genrec_jax.export.ort_client import OnnxRecommender, beam_search
    from genrec_jax.export.parity import real_histories
    from genrec_jax.train.restore import load_trained

    manifest = read_manifest(export_dir)
    tm = load_trained(checkpoint)
    full = real_histories(tm, users, pad_len)
    keep = full["lengths"] > 0
    rng = np.random.default_rng(seed)
    enc_in, _ = manifest.graphs["encoder"].io()
    names = [t["name"] for t in enc_in]
    n = int(keep.sum())
    client = OnnxRecommender(export_dir) if graph == "decode_step" else None
    batches: list[dict[str, np.ndarray]] = []
    for s in range(0, n - batch_size + 1, batch_size):
        b = {k: np.asarray(full[k])[keep][s:s + batch_size].astype(t["dtype"]) for k, t in zip(names, enc_in)}
        if graph == "encoder":
            batches.append(b)
        elif graph == "ranker":
            m = int(manifest.dims["M"]["opt"])
            cands = rng.integers(1, manifest.model["num_items"] + 1, (batch_size, m)).astype(np.int32)
            cands[:, 0] = np.asarray(full["target_items"])[keep][s:s + batch_size]
            req = b["query_timestamps"][np.arange(batch_size), b["lengths"] - 1]
            batches.append({**b, "candidates": cands, "candidate_timestamp": req.astype(np.int32)})
        elif graph == "decode_step":
            assert client is not None
            enc = client.encode(b)
            dec_in, _ = manifest.graphs["decode_step"].io()
            w = int(manifest.dims["W"]["opt"])

            def record(feeds, _sink=batches):
                _sink.append({k: np.array(v) for k, v in feeds.items()})
                return client.run("decode_step", feeds)

            beam_search(record, client.trie, enc, {t["name"]: t for t in dec_in}, k=w, beam_width=w,
                        history=client.repeat_history(b))
        else:
            raise KeyError(f"unknown graph {graph!r}")
    if not batches:
        raise ValueError(f"only {n} usable users: lower --calib-batch or raise --calib-users")
    return CalibrationData(batches)


def make_calibrator(data: CalibrationData, input_names: list[str], cache_file: str | Path):
    """A ``trt.IInt8EntropyCalibrator2`` streaming ``data`` to the GPU (cache in ``cache_file``)."""
    trt = import_tensorrt()
    cudart = import_cudart()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._it = iter(data)
            self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)
            self.cache_file = Path(cache_file)

        def get_batch_size(self) -> int:
            return data.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._it, None)
            if batch is None:
                return None
            ptrs = []
            for name in names:
                arr = np.ascontiguousarray(batch[name])
                ptr, size = self._buffers.get(name, (0, 0))
                if size < arr.nbytes:
                    if ptr:
                        _check(cudart.cudaFree(ptr))
                    ptr = _check(cudart.cudaMalloc(arr.nbytes))
                    self._buffers[name] = (ptr, arr.nbytes)
                _check(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                ptrs.append(int(ptr))
            return ptrs

        def read_calibration_cache(self) -> bytes | None:
            return self.cache_file.read_bytes() if self.cache_file.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            self.cache_file.write_bytes(bytes(cache))

    del input_names  # the calibrator receives the names from TensorRT
    return EntropyCalibrator()


def _check(result):
    """Unwrap a cuda-python call: (err, value...) -> value, raising on an error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


# --------------------------------------------------------------------------- build


@dataclasses.dataclass
class BuildOptions:
    precision: str = "fp16"
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    optimization_level: int = 3
    calibrator: Any = None  # trt.IInt8Calibrator for int8
    strongly_typed: bool = False  # for the *.fp16.onnx source: keep the graph's own dtypes


def build_engine(onnx_path: str | Path, plan_path: str | Path, shapes: Shapes, options: BuildOptions,
                 log: Callable[[str], None] = print) -> Path:
    """Parse ``onnx_path``, build a serialized engine with one profile ``shapes``, write it."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if not options.strongly_typed:
        if options.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if options.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        mn, opt, mx = shapes[name]
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    if options.precision == "int8" and options.calibrator is not None:
        config.int8_calibrator = options.calibrator
        config.set_calibration_profile(profile)
    cache = None
    if options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache is not None and options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"  {plan_path.name}: {plan_path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s")
    return plan_path


# --------------------------------------------------------------------------- run


class EngineRunner:
    """Runs a serialized engine on numpy inputs (one CUDA stream, buffers per call)."""

    def __init__(self, plan_path: str | Path):
        trt = import_tensorrt()
        self.cudart = import_cudart()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        allocs = []
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_input_shape(name, arr.shape)
                ptr = _check(cudart.cudaMalloc(max(arr.nbytes, 1)))
                allocs.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, int(ptr))
            results: dict[str, np.ndarray] = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                arr = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMalloc(max(arr.nbytes, 1)))
                allocs.append(ptr)
                self.context.set_tensor_address(name, int(ptr))
                results[name] = arr
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            for name, arr in results.items():
                ptr = self.context.get_tensor_address(name)
                _check(cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return results
        finally:
            for ptr in allocs:
                cudart.cudaFree(ptr)


def check_engine(runner: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], onnx_path: str | Path,
                 feeds_list: list[tuple[str, dict[str, np.ndarray]]], *, graph: str, precision: str):
    """Parity of an engine (any callable feeds -> outputs) with ONNX Runtime on the same inputs."""
    from genrec_jax.export.parity import TIE_SENSITIVE, ParityReport, relative_error, session

    sess = session(onnx_path)
    in_types = {i.name: ("float16" if i.type == "tensor(float16)" else None) for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    reports = []
    for label, feeds in feeds_list:
        feeds = {k: (v.astype(in_types[k]) if in_types.get(k) else v) for k, v in feeds.items()}
        want = dict(zip(names, sess.run(names, feeds)))
        got = runner(feeds)
        errors, agreement = {}, None
        for n in names:
            if n in TIE_SENSITIVE:
                agreement = float(np.mean(got[n] == want[n]))
            else:
                errors[n] = relative_error(got[n], want[n])
        reports.append(ParityReport(graph, "fp32" if precision == "fp32" else "fp16", f"engine-{label}", errors,
                                    agreement))
    return reports


def engine_feeds(export_dir: Path, graph: str, manifest: Manifest, checkpoint: str | Path | None,
                 seed: int = 0) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Random inputs at the profile's opt shapes (+ real ones when the checkpoint is given)."""
    rng = np.random.default_rng(seed)
    shapes = profile_shapes(manifest, graph)
    ins, _ = manifest.graphs[graph].io()
    m = manifest.model
    feeds: dict[str, np.ndarray] = {}
    for t in ins:
        shape = shapes[t["name"]][1]
        n = t["name"]
        if n in ("items", "candidates"):
            a = rng.integers(1, m["num_items"] + 1, shape)
        elif n == "actions":
            a = rng.integers(0, m["num_actions"], shape)
        elif n in ("timestamps", "query_timestamps"):
            a = np.cumsum(rng.integers(0, 100_000, shape), axis=-1)
        elif n == "lengths":
            a = rng.integers(1, shapes["items"][1][1] + 1, shape)
        elif n == "candidate_timestamp":
            a = np.full(shape, 10**7)
        elif n == "prev_codes":
            a = rng.integers(0, min(m["code_sizes"]), shape)
        elif n == "level":
            a = np.array([1])
        elif n == "cross_valid":
            a = np.ones(shape, bool)
        elif t["dtype"].startswith("float"):
            a = rng.standard_normal(shape)
        else:
            a = np.zeros(shape)
        feeds[n] = np.asarray(a).astype(t["dtype"])
    out = [("random", feeds)]
    if checkpoint is not None:
        data = calibration_data(export_dir, graph, checkpoint, users=64, batch_size=16, seed=seed)
        out.append(("real", data.batches[0]))
    return out


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m genrec_jax.export.build_engine",
                                 description="Build TensorRT engines from an export directory and check them.")
    ap.add_argument("--export-dir", required=True)
    ap.add_argument("--graphs", default=None, help="comma-separated (default: every exported graph)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--source", choices=("fp32", "fp16"), default="fp32",
                    help="which ONNX variant to parse (fp16: *.fp16.onnx as a strongly typed network)")
    ap.add_argument("--out", default=None, help="engine directory (default EXPORT_DIR/engines)")
    ap.add_argument("--timing-cache", default=None, help="timing cache file (read if present, then updated)")
    ap.add_argument("--workspace-gib", type=float, default=4.0)
    ap.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=MIN,OPT,MAX",
                    help="override an axis range of the profile, e.g. --dim B=1,32,128")
    ap.add_argument("--calib-checkpoint", default=None, help="training run whose histories calibrate INT8")
    ap.add_argument("--calib-users", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=32)
    ap.add_argument("--triton-repo", default=None, help="also copy each plan to REPO/<graph>/1/model.plan")
    ap.add_argument("--check", action="store_true", help="compare every engine with ONNX Runtime")
    ap.add_argument("--print-shapes", action="store_true", help="print the profiles (no TensorRT needed) and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    export_dir = Path(args.export_dir)
    manifest = read_manifest(export_dir)
    graphs = args.graphs.split(",") if args.graphs else list(manifest.graphs)
    unknown = [g for g in graphs if g not in manifest.graphs]
    if unknown:
        print(f"error: not in the export: {unknown} (have {list(manifest.graphs)})", file=sys.stderr)
        return 2
    overrides = parse_dim_overrides(args.dim)
    if args.print_shapes:
        for g in graphs:
            print(g)
            for name, (mn, opt, mx) in profile_shapes(manifest, g, overrides=overrides).items():
                print(f"  {name}: min {list(mn)} opt {list(opt)} max {list(mx)}")
        return 0
    if args.precision == "int8" and args.calib_checkpoint is None:
        print("error: --precision int8 needs --calib-checkpoint RUN_DIR (real histories to calibrate on)",
              file=sys.stderr)
        return 2
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    out = Path(args.out) if args.out else export_dir / "engines"
    failed = False
    for g in graphs:
        entry = manifest.graphs[g]
        src = export_dir / entry.path(args.source)
        calibrator = None
        if args.precision == "int8":
            data = calibration_data(export_dir, g, args.calib_checkpoint, users=args.calib_users,
                                    batch_size=args.calib_batch)
            calibrator = make_calibrator(data, [t["name"] for t in entry.inputs], out / f"{g}.int8.calib")
        opts = BuildOptions(precision=args.precision, workspace_gib=args.workspace_gib,
                            timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                            optimization_level=args.opt_level, calibrator=calibrator,
                            strongly_typed=args.source == "fp16")
        plan = build_engine(src, out / f"{g}.{args.precision}.plan", profile_shapes(manifest, g, overrides=overrides),
                            opts)
        if args.triton_repo:
            dst = Path(args.triton_repo) / g / "1" / "model.plan"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(plan.read_bytes())
        if args.check:
            feeds = engine_feeds(export_dir, g, manifest, args.calib_checkpoint)
            reports = check_engine(EngineRunner(plan), src, feeds, graph=g, precision=args.precision)
            for r in reports:
                gate = args.precision != "int8"
                status = "ok" if r.ok() else ("FAIL" if gate else "(int8, not gated)")
                print(f"  {g} {r.inputs}: max rel. error {r.max_error:.2e} {status}")
                failed |= gate and not r.ok()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""One call signature, three ways to run the same ``@triton.jit`` kernel bodies.

Every wrapper in ``genrec_jax.kernels`` launches its kernels through :func:`triton_call`,
whose arguments mirror ``jax_triton.triton_call`` (array/scalar inputs in kernel-argument
order, then one pointer per output, then constexpr meta-parameters by keyword). The launch
*mode* decides what happens:

``"jax_triton"`` (the default)
    ``jax_triton.triton_call``: an XLA custom call on the CUDA device; works under ``jit``,
    ``grad`` (through the wrappers' ``custom_vjp``) and donation. Autotuned kernels
    (``triton.autotune``) are tuned by jax-triton on first execution unless ``config`` pins
    one configuration.
``"interpret"``
    Triton's CPU interpreter on torch CPU tensors, reached from JAX through
    ``jax.pure_callback`` — so the *same* wrapper code (packing, grids, ``custom_vjp``) runs
    on a machine without a GPU. Outputs are poisoned (NaN-filled) before the launch unless
    they are listed in ``zeroed_outputs``, so an element the kernel never writes shows up.
``"torch"``
    The native Triton launcher on torch CUDA tensors (again behind ``pure_callback``, with
    poisoned outputs). Used by ``bench/gpu_check.py`` to prove on real hardware that every
    output element is written; slow (host round trips), never for production.

Pick the mode with the ``mode=`` argument, the :func:`launch_mode` context manager, or the
environment (``GENREC_TRITON_LAUNCH=interpret|torch|jax_triton``; ``TRITON_INTERPRET=1``
implies ``interpret``).

Autotuning costs a compile of every configuration at every call site whose autotune key
is new (jax-triton does not share results between call sites): minutes for a deep model.
``GENREC_TRITON_AUTOTUNE=0`` skips it and launches each kernel's first configuration (the
list is ordered so the first is a good default on Hopper). Nothing here imports triton, torch or jax-triton at module import.

Interpreter notes (triton 3.6): kernel arguments must be torch tensors (the interpreter
copies storages), nested ``@triton.jit`` helpers are swapped for interpreted twins while a
kernel runs, and ``tl.dot`` on bfloat16 operands is patched to decode the bf16 bit pattern
(the stock interpreter multiplies the raw uint16 words).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("jax_triton", "interpret", "torch")

_local = threading.local()
_interp_lock = threading.RLock()


def default_mode() -> str:
    env = os.environ.get("GENREC_TRITON_LAUNCH")
    if env:
        if env not in MODES:
            raise ValueError(f"GENREC_TRITON_LAUNCH={env!r}; expected one of {MODES}")
        return env
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpret"
    return "jax_triton"


class _DropAutotuneKeyWarning:
    """jax-triton warns at every lowering that the autotune key leaves out scalar arguments.
    Ours are the score scale and the bias-table sizes, which do not change which block shape
    is fastest: the warning says nothing actionable, and a deep model prints it hundreds of
    times."""

    def filter(self, record) -> bool:
        return "Auto-tuning key does not include all scalar arguments" not in record.getMessage()


_warning_filter = _DropAutotuneKeyWarning()


def _quiet_autotune_warning() -> None:
    import logging

    log = logging.getLogger("absl")
    if _warning_filter not in log.filters:
        log.addFilter(_warning_filter)


def autotune_enabled() -> bool:
    """False when ``GENREC_TRITON_AUTOTUNE`` is 0/false/off: autotuned kernels run their first config."""
    return os.environ.get("GENREC_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def current_mode() -> str:
    return getattr(_local, "mode", None) or default_mode()


@contextlib.contextmanager
def launch_mode(mode: str):
    """Run the enclosed wrapper calls in ``mode`` (read at trace time: jit'ed callers that
    were traced under another mode keep theirs)."""
    if mode not in MODES:
        raise ValueError(f"unknown launch mode {mode!r}; expected one of {MODES}")
    prev = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = prev


# --------------------------------------------------------------------------- kernels


def base_jit(kernel):
    """The plain JITFunction (or InterpretedFunction) under autotune/heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def python_fn(kernel) -> Callable:
    """The undecorated Python function of a kernel."""
    k = base_jit(kernel)
    while not inspect.isfunction(k):
        k = k.fn
    return k


def autotune_configs(kernel) -> list[dict]:
    """The autotune configurations of ``kernel`` as flat dicts (meta-parameters plus
    ``num_warps``/``num_stages``); one empty dict for a plain kernel."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [{}]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kernel.configs]


def _split_config(config: dict | None) -> tuple[dict, int | None, int | None]:
    cfg = dict(config or {})
    return cfg, cfg.pop("num_warps", None), cfg.pop("num_stages", None)


def _is_scalar(x) -> bool:
    return isinstance(x, (bool, int, float, np.floating, np.integer))


# --------------------------------------------------------------------------- launch


def triton_call(
    *args: Any,
    kernel,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]],
    name: str = "",
    zeroed_outputs: Sequence[int] = (),
    config: dict | None = None,
    mode: str | None = None,
    **metaparams: Any,
) -> list[jax.Array]:
    """Launch ``kernel`` on ``args`` and return its outputs (always a list).

    ``config`` pins block sizes and ``num_warps``/``num_stages`` (bypassing autotuning);
    without it jax-triton autotunes an autotuned kernel, while the callback modes use the
    kernel's first autotune configuration. Float scalars are passed as float32, Python ints
    as int32.
    """
    mode = mode or current_mode()
    out_shape = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shape]
    args = tuple(np.float32(a) if isinstance(a, float) else a for a in args)
    if mode == "jax_triton":
        import jax_triton as jt

        _quiet_autotune_warning()
        from triton.runtime.autotuner import Autotuner

        if config is None and isinstance(kernel, Autotuner) and not autotune_enabled():
            config = autotune_configs(kernel)[0]
        if config is None:
            if isinstance(kernel, Autotuner):
                # jax-triton assigns early_config_prune/nargs on the object at every lowering,
                # chaining the previous prune function: give it a private shallow copy.
                kernel = copy.copy(kernel)
            outs = jt.triton_call(*args, kernel=kernel, out_shape=out_shape, grid=grid, name=name,
                                  zeroed_outputs=tuple(zeroed_outputs), **metaparams)
        else:
            meta, num_warps, num_stages = _split_config(config)
            outs = jt.triton_call(*args, kernel=base_jit(kernel), out_shape=out_shape, grid=grid, name=name,
                                  zeroed_outputs=tuple(zeroed_outputs), num_warps=num_warps,
                                  num_stages=num_stages, **meta, **metaparams)
        return list(outs)
    if mode not in ("interpret", "torch"):
        raise ValueError(f"unknown launch mode {mode!r}; expected one of {MODES}")
    if config is None:
        config = autotune_configs(kernel)[0]
    meta, num_warps, num_stages = _split_config(config)
    meta = {**meta, **metaparams}
    grid_t = tuple(grid(meta) if callable(grid) else grid)
    arrays = [a for a in args if not _is_scalar(a)]
    interpret = mode == "interpret"

    def callback(*np_arrays):
        return run_native(kernel, grid_t, args, np_arrays, out_shape, meta, zeroed_outputs=zeroed_outputs,
                          num_warps=num_warps, num_stages=num_stages, interpret=interpret)

    outs = jax.pure_callback(callback, tuple(out_shape), *arrays, vmap_method="sequential")
    return list(outs)


# --------------------------------------------------------------------------- native / interpreter


def _to_torch(x: np.ndarray, device: str):
    import torch

    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(x, copy=True, order="C"))
    return t.to(device)


def _from_torch(t, dtype) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def _poisoned(shape, dtype, device: str, zero: bool):
    import torch

    dtype = np.dtype(dtype)
    tdt = torch.bfloat16 if dtype == jnp.bfloat16 else getattr(torch, dtype.name)
    if zero:
        return torch.zeros(shape, dtype=tdt, device=device)
    fill = float("nan") if (dtype == jnp.bfloat16 or np.issubdtype(dtype, np.floating)) else -(2**30) + 7
    return torch.full(shape, fill, dtype=tdt, device=device)


def run_native(kernel, grid, args, np_arrays, out_shape, meta, *, zeroed_outputs=(), num_warps=None,
               num_stages=None, interpret=True):
    """Run ``kernel[grid]`` on torch tensors made from ``np_arrays`` (which replace, in order,
    the non-scalar entries of ``args``); returns the outputs as numpy arrays."""
    device = "cpu" if interpret else "cuda"
    it = iter(np_arrays)
    call_args = []
    for a in args:
        if _is_scalar(a):
            call_args.append(float(a) if isinstance(a, (float, np.floating)) else int(a))
        else:
            call_args.append(_to_torch(next(it), device))
    outs = [_poisoned(s.shape, s.dtype, device, i in set(zeroed_outputs)) for i, s in enumerate(out_shape)]
    if interpret:
        with _interpreted_globals(kernel), _bf16_dot_patch(), _patch_lang_once():
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction(python_fn(kernel))[grid](*call_args, *outs, **meta)
    else:
        opts = {}
        if num_warps is not None:
            opts["num_warps"] = num_warps
        if num_stages is not None:
            opts["num_stages"] = num_stages
        _ensure_cache_dir()
        base_jit(kernel)[grid](*call_args, *outs, **meta, **opts)
        import torch

        torch.cuda.synchronize()
    return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shape))


def _ensure_cache_dir() -> None:
    """Give triton's file cache a directory when it resolves to none.

    The native launcher compiles through triton's ``FileCacheManager``, which raises "Could
    not create or locate cache dir" when ``triton.knobs.cache.dir`` is empty; on the GPU
    machine that happened inside jax's CPU callback (``bench/results/h100-2026-11-23b``).
    An explicit ``TRITON_CACHE_DIR`` wins; otherwise a directory under the system temp dir.
    """
    from triton import knobs

    if not knobs.cache.dir:
        import tempfile

        path = os.environ.get("TRITON_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "genrec-triton-cache")
        os.makedirs(path, exist_ok=True)
        knobs.cache.dir = path


@contextlib.contextmanager
def _interpreted_globals(kernel):
    """Swap every ``@triton.jit`` function the kernel can reach for an interpreted twin.

    The interpreter executes the kernel's Python body with the module's globals, where the
    helpers are compiled-mode JITFunctions (which refuse to be called from Python); the same
    holds for triton's own jit'ed library functions (``tl.zeros``, ``tl.sum``, ``tl.max``...),
    which are only interpretable when triton was imported with TRITON_INTERPRET=1."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    try:  # imported lazily by the interpreter; it copies tl functions and must see the originals
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    namespaces = [python_fn(kernel).__globals__, vars(tl)]
    for sub in ("standard", "random", "math"):
        mod = getattr(tl, sub, None)
        if mod is not None and inspect.ismodule(mod):
            namespaces.append(vars(mod))
    with _interp_lock:
        saved = [(ns, {k: v for k, v in ns.items() if isinstance(v, JITFunction)}) for ns in namespaces]
        try:
            for ns, jitted in saved:
                for k, v in jitted.items():
                    ns[k] = InterpretedFunction(v.fn)
            yield
        finally:
            for ns, jitted in saved:
                ns.update(jitted)


@contextlib.contextmanager
def _patch_lang_once():
    """Two fixes to triton 3.6's ``_patch_lang``, which swaps ``tl`` builtins for interpreter
    versions. (1) Nested ``@triton.jit`` calls patch again (for the ``tl`` modules their own
    globals see) and never restore, which would leave ``tl`` patched for later compiled
    launches in the same process, and re-patch on every call: here each distinct set of
    modules is patched once per launch and everything is restored, innermost first, when the
    grid-level scope is. (2) ``tensor.__index__`` does ``int()`` on a one-element array,
    which numpy >= 2.4 refuses (``range`` with tensor bounds needs it)."""
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig = ti._patch_lang
    scopes: list = []
    done: set = set()

    def fix_index(scope):
        scope.set_attr(tl.tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    def patch_lang(fn):
        key = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        if scopes and key in done:
            return ti._LangPatchScope()
        scope = orig(fn)
        fix_index(scope)
        done.add(key)
        if not scopes:
            outer_restore = scope.restore

            def restore_all():
                for inner in reversed(scopes[1:]):
                    inner.restore()
                outer_restore()
                scopes.clear()
                done.clear()

            scope.restore = restore_all
        scopes.append(scope)
        return scope

    with _interp_lock:
        ti._patch_lang = patch_lang
        try:
            yield
        finally:
            ti._patch_lang = orig


@contextlib.contextmanager
def _bf16_dot_patch():
    """triton 3.6's interpreter stores bf16 as raw uint16 and feeds those integers to
    ``np.matmul``; decode them to float32 first (exact: bf16 is the top half of fp32)."""
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig = ti.InterpreterBuilder.create_dot

    def decode(h):
        if h.dtype == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, decode(a), decode(b), d, input_precision, max_num_imprecise_acc)

    with _interp_lock:
        ti.InterpreterBuilder.create_dot = create_dot
        try:
            yield
        finally:
            ti.InterpreterBuilder.create_dot = orig


# --------------------------------------------------------------------------- static compile check


def compile_for_target(kernel, signature: dict[str, str], constexprs: dict[str, Any], *, num_warps: int = 4,
                       num_stages: int = 3, arch: int = 90):
    """Compile ``kernel`` for an NVIDIA target with no GPU present (triton ships ptxas).

    ``signature`` maps every non-constexpr argument to its Triton type (``"*bf16"``,
    ``"i32"``, ``"fp32"``); pointers are assumed 16-byte aligned, as jax-triton assumes.
    Returns the compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = base_jit(kernel)
    sig = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(compiled, arch: str = "sm_90a") -> str:
    """``ptxas -v`` on a compiled kernel's PTX: registers, spills, shared memory."""
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
        path = f.name
    try:
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
        return res.stderr + res.stdout
    finally:
        os.unlink(path)

"""jax2onnx plugin adjustments the recommender's graphs need (installed before every export).

jax2onnx 0.17 converts the whole model; two of its lowerings produce graphs that either fail
to trace with symbolic (dynamic) axes or that TensorRT cannot build efficiently. Both are
fixed here at the plugin level, so the graphs stay exactly what the JAX model traces:

1. **Symbolic-shape fallback for the ``jax.numpy`` rewrites.** jax2onnx replaces many
   ``jnp`` functions (``full``, ``arange``, ``concatenate``, ...) by its own primitives
   while tracing, each with its own shape rule. Those rules assume concrete sizes:
   ``jnp.full((B, L), ...)`` and ``jnp.arange(L)`` with the symbolic dims "B" / "L" fail
   (``InconclusiveDimensionOperation``, a placeholder dim that indexing rejects), and
   ``jnp.concatenate`` of a [B, L] and a [B, M] array is typed [B, L] instead of
   [B, L + M] -- which silently corrupts every later ``x.shape[1]`` turned into a value
   (jax2onnx reads such sizes from the last tensor typed with that symbol). So: a call
   given a symbolic size as a Python value goes to the original ``jnp`` function (it
   lowers to ``lax`` primitives, whose shapes JAX computes and whose conversions handle
   dynamic axes); a call on arrays with symbolic shapes keeps the rewrite only when
   ``jax.eval_shape`` types the rewrite's result exactly like the original's. Calls
   mixing float dtypes (fp16 weights in an fp32 island of the fp16 graph: MoE router,
   norms) also go to the original, whose type promotion inserts the casts that the
   rewrites leave out (a MatMul of float32 by float16 is invalid ONNX). Two
   rewrites are never used (``KEEP_JNP``): ``clip`` and ``einsum``, see there.

2. **``dot_general`` honours ``preferred_element_type``.** The model accumulates attention
   scores in float32 from float16 operands (``einsum(..., preferred_element_type=f32)``);
   jax2onnx's MatMul lowering types the product like its operands, so the fp16 graph
   mixed float16 and float32 inputs of one node (invalid ONNX). The product is cast to the
   dtype JAX gives it, and an operand whose dtype differs from the result's (JAX's
   dot_general accepts f32 x f16) is cast first.

4. **Export speed.** Only jax2onnx's jax / flax.nnx plugin trees are imported (not its
   equinox, dm_pix, linen and example trees). After every equation jax2onnx checks that the values it bound are
   produced by a node of the graph by scanning every node built so far (quadratic: two
   thirds of a ranker export). A value whose producer node already sits in the graph
   is accepted at once; anything else still goes through the original check.

3. **Statically in-bounds scatters skip the runtime bounds filter.** ``x.at[:, 0].set(v)``
   is a ``FILL_OR_DROP`` scatter; jax2onnx's window-scatter lowering then drops
   out-of-bounds updates at run time with a ``NonZero`` (a data-dependent output shape,
   which TensorRT only supports slowly, if at all). When the scatter indices are
   compile-time constants that are in bounds for every size the symbolic axes can take
   (dims are >= 1), the mode is rewritten to ``PROMISE_IN_BOUNDS``: same values, no
   ``NonZero``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.export import is_symbolic_dim

_INSTALLED = False

# jnp functions traced as JAX defines them (through lax), never through jax2onnx's rewrite:
#   clip   -- the rewrite emits ONNX Clip, which TensorRT supports for floats only (the
#             model clips int32 positions and time buckets); lax gives Max/Min;
#   einsum -- the rewrite emits ONNX Einsum with "..." equations; lax.dot_general gives
#             MatMul/Gemm (TensorRT's fast path; older parsers reject ellipsis).
KEEP_JNP = frozenset({"clip", "einsum"})


def install() -> None:
    """Apply both adjustments to jax2onnx's plugin registry (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _import_core_plugins()
    _install_symbolic_jnp_fallback()
    _install_static_scatter_bounds()
    _install_dot_general_result_dtype()
    _install_fast_connectivity_check()
    _INSTALLED = True


def _import_core_plugins() -> None:
    """Register the jax.numpy / jax.lax / flax.nnx plugins only. jax2onnx's
    ``import_all_plugins`` also imports its equinox, dm_pix, flax.linen and example trees
    (10 s of imports on two cores); ``import_all`` below restores the full set."""
    import jax2onnx.plugins.plugin_system as ps

    if ps._already_imported_plugins:
        return
    root = Path(ps.__file__).parent
    for sub in ("jax", "flax/nnx"):
        ps._import_tree(root / sub, "jax2onnx.plugins." + sub.replace("/", "."))
    ps._already_imported_plugins = True  # stops jax2onnx from importing the rest on its own


def import_all() -> None:
    """Import every jax2onnx plugin (for a graph using primitives outside the core set),
    then re-apply the adjustments to the new ones."""
    import jax2onnx.plugins.plugin_system as ps

    ps._import_tree(Path(ps.__file__).parent, "jax2onnx.plugins")
    _install_symbolic_jnp_fallback()


# --------------------------------------------------------------------------- 1. symbolic dims


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer))


def _symbolic_size_arg(x: Any, depth: int = 0) -> bool:
    """A symbolic size passed as a Python value (``jnp.arange(L)``, ``jnp.full((B, L), v)``)."""
    if is_symbolic_dim(x):
        return True
    if depth < 2 and isinstance(x, (tuple, list)):
        return any(_symbolic_size_arg(y, depth + 1) for y in x)
    return False


def _symbolic_shapes(leaves: list) -> bool:
    return any(_is_array(x) and any(is_symbolic_dim(d) for d in x.shape) for x in leaves)


def _mixed_float_dtypes(leaves: list) -> bool:
    kinds = {x.dtype for x in leaves if _is_array(x) and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)}
    return len(kinds) > 1


def _same_abstract_result(patched, orig, args, kwargs) -> bool:
    """Whether jax2onnx's rewrite types its result like JAX's own function does."""
    flat, tree = jax.tree.flatten((args, kwargs))
    idx = [i for i, x in enumerate(flat) if _is_array(x)]

    def call(fn):
        def run(*arrays):
            leaves = list(flat)
            for i, a in zip(idx, arrays):
                leaves[i] = a
            a2, k2 = jax.tree.unflatten(tree, leaves)
            return fn(*a2, **k2)
        return run

    specs = [jax.ShapeDtypeStruct(flat[i].shape, flat[i].dtype) for i in idx]
    try:
        got = jax.eval_shape(call(patched), *specs)
        want = jax.eval_shape(call(orig), *specs)
    except Exception:  # the rewrite cannot even type the call: use JAX's function
        return False
    g, w = jax.tree.leaves(got), jax.tree.leaves(want)
    return len(g) == len(w) and all(
        tuple(map(str, a.shape)) == tuple(map(str, b.shape)) and a.dtype == b.dtype for a, b in zip(g, w))


def _symbolic_fallback(make_value):
    """Wrap a MonkeyPatchSpec.make_value so that, with symbolic sizes, a rewrite is used only
    when it types its result exactly like the original ``jnp`` function."""

    def make(orig):
        patched = make_value(orig)
        if orig is None or not callable(patched):
            return patched

        def fn(*args, **kwargs):
            if _symbolic_size_arg(args) or _symbolic_size_arg(tuple(kwargs.values())):
                return orig(*args, **kwargs)
            leaves = jax.tree.leaves((args, kwargs))
            if _mixed_float_dtypes(leaves):  # JAX's own promotion inserts the casts
                return orig(*args, **kwargs)
            if _symbolic_shapes(leaves) and not _same_abstract_result(patched, orig, args, kwargs):
                return orig(*args, **kwargs)
            return patched(*args, **kwargs)

        fn.__wrapped__ = patched  # type: ignore[attr-defined]
        return fn

    return make


def _install_symbolic_jnp_fallback() -> None:
    from jax2onnx.plugins._patching import MonkeyPatchSpec
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY, PrimitiveLeafPlugin

    for plugin in list(PLUGIN_REGISTRY.values()):
        cls = plugin.__class__
        if not isinstance(plugin, PrimitiveLeafPlugin) or cls.__dict__.get("_genrec_symbolic_fallback"):
            continue
        original = cls.binding_specs

        def binding_specs(klass, _original=original):
            specs = []
            for s in _original():
                if isinstance(s, MonkeyPatchSpec) and s.target == "jax.numpy":
                    if s.attr in KEEP_JNP:
                        continue
                    s = dataclasses.replace(s, make_value=_symbolic_fallback(s.make_value))
                specs.append(s)
            return specs

        cls.binding_specs = classmethod(binding_specs)
        cls._genrec_symbolic_fallback = True


# --------------------------------------------------------------------------- 3. scatter bounds


def _window_sizes(spec, operand_rank: int, updates_shape) -> dict[int, Any]:
    """Window extent (int or symbolic) of every operand axis a scatter index addresses."""
    inserted = set(spec.inserted_window_dims)
    batching = set(getattr(spec, "operand_batching_dims", ()) or ())
    window_axes = [d for d in range(operand_rank) if d not in inserted and d not in batching]
    sizes: dict[int, Any] = {d: 1 for d in inserted | batching}
    for operand_axis, update_axis in zip(window_axes, spec.update_window_dims):
        sizes[operand_axis] = updates_shape[update_axis]
    return sizes


def scatter_statically_in_bounds(indices: np.ndarray | None, operand_shape, updates_shape, spec) -> bool:
    """True when every (constant) scatter index keeps its window inside the operand for
    every value the symbolic dims can take (each symbolic dim is at least 1)."""
    if indices is None:
        return False
    axes = tuple(spec.scatter_dims_to_operand_dims)
    if not axes or indices.size % len(axes):
        return False
    idx = np.asarray(indices).reshape(-1, len(axes))
    sizes = _window_sizes(spec, len(operand_shape), updates_shape)
    for col, axis in enumerate(axes):
        dim, win = operand_shape[axis], sizes.get(axis, 1)
        lo, hi = int(idx[:, col].min()), int(idx[:, col].max())
        if lo < 0:
            return False
        if isinstance(dim, (int, np.integer)) and isinstance(win, (int, np.integer)):
            if hi + int(win) > int(dim):
                return False
        elif isinstance(win, (int, np.integer)) and int(win) == 1:
            if hi != 0:  # a symbolic dim is only known to be >= 1
                return False
        elif win is dim or (not isinstance(win, (int, np.integer)) and str(win) == str(dim)):
            if hi != 0:
                return False
        else:
            return False
    return True


def _install_static_scatter_bounds() -> None:
    import jax
    from jax2onnx.ir_utils import const_value_to_numpy
    from jax2onnx.plugins.jax.lax import scatter_utils
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY

    if getattr(scatter_utils, "_genrec_static_bounds", False):
        return
    original = scatter_utils.lower_scatter_common

    def lower_scatter_common(ctx, eqn, **kwargs):
        mode = eqn.params.get("mode")
        if mode is not None and "FILL_OR_DROP" in str(getattr(mode, "name", mode)).upper():
            operand_var, indices_var, updates_var = eqn.invars
            try:
                indices = const_value_to_numpy(ctx.get_value_for_var(indices_var))
            except Exception:  # not a constant: keep jax2onnx's runtime filter
                indices = None
            spec = scatter_utils._normalize_dimension_numbers(eqn.params.get("dimension_numbers"))
            if scatter_statically_in_bounds(indices, tuple(operand_var.aval.shape),
                                            tuple(updates_var.aval.shape), spec):
                params = dict(eqn.params, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
                eqn = eqn.replace(params=params)
        return original(ctx, eqn, **kwargs)

    scatter_utils.lower_scatter_common = lower_scatter_common
    # The plugin modules imported the function by name: rebind it there too.
    for plugin in PLUGIN_REGISTRY.values():
        mod = __import__(plugin.__class__.__module__, fromlist=["_"])
        if getattr(mod, "lower_scatter_common", None) is original:
            mod.lower_scatter_common = lower_scatter_common
    scatter_utils._genrec_static_bounds = True


# --------------------------------------------------------------------------- 2. dot_general dtype


def _install_dot_general_result_dtype() -> None:
    import onnx_ir as ir
    from jax2onnx.ir_utils import numpy_dtype_to_ir
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
    from jax.extend.core import Literal
    from jax2onnx.plugins.jax.lax.dot_general import DotGeneralPlugin

    if DotGeneralPlugin.__dict__.get("_genrec_result_dtype"):
        return
    original = DotGeneralPlugin.lower

    def lower(self, ctx, eqn):
        # Mixed operand dtypes (dot_general(f32, f16), allowed by JAX): cast the narrower
        # operand to the result dtype for the duration of this lowering.
        out_dt = np.dtype(eqn.outvars[0].aval.dtype)
        rebound = []
        if len({np.dtype(v.aval.dtype) for v in eqn.invars}) > 1:
            for var in eqn.invars:
                if np.dtype(var.aval.dtype) != out_dt and not isinstance(var, Literal):
                    val = ctx.get_value_for_var(var)
                    cast = ctx.builder.Cast(val, _outputs=[ctx.fresh_name("dot_in_cast")],
                                            to=int(numpy_dtype_to_ir(out_dt).value))
                    cast.type = ir.TensorType(numpy_dtype_to_ir(out_dt))
                    _stamp_type_and_shape(cast, tuple(var.aval.shape))
                    _ensure_value_metadata(ctx, cast)
                    rebound.append((var, val))
                    ctx.bind_value_for_var_without_origins(var, cast)
        try:
            original(self, ctx, eqn)
        finally:
            for var, val in rebound:
                ctx.bind_value_for_var_without_origins(var, val)
        out_var = eqn.outvars[0]
        want = numpy_dtype_to_ir(np.dtype(out_var.aval.dtype))
        val = ctx.get_value_for_var(out_var)
        have = getattr(getattr(val, "type", None), "dtype", None)
        if have is None or have == want:
            return
        cast = ctx.builder.Cast(val, _outputs=[ctx.fresh_name("dot_out_cast")], to=int(want.value))
        cast.type = ir.TensorType(want)
        _stamp_type_and_shape(cast, tuple(out_var.aval.shape))
        _ensure_value_metadata(ctx, cast)
        ctx.bind_value_for_var(out_var, cast)

    DotGeneralPlugin.lower = lower
    DotGeneralPlugin._genrec_result_dtype = True


# --------------------------------------------------------------------------- 4. export speed


def _install_fast_connectivity_check() -> None:
    from jax2onnx.converter import output_binding

    if getattr(output_binding, "_genrec_fast", False):
        return
    original = output_binding._value_is_graph_connected

    def connected(ctx, value) -> bool:
        producer = value.producer() if hasattr(value, "producer") else None
        graph = getattr(ctx.builder, "_nodes", None)
        if producer is not None and graph is not None and getattr(producer, "graph", None) is graph:
            return True
        return original(ctx, value)

    output_binding._value_is_graph_connected = connected
    output_binding._genrec_fast = True

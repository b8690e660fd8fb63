"""Device mesh and the one table that maps logical parameter axes onto it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state sharded), ``tensor`` (heads / hidden units / item table rows split),
``expert`` (MoE experts split; tokens are also split along it outside the experts).

Parameters name their axes (``embed``, ``heads``, ``mlp``, ``vocab``, ``exp`` ...);
``LOGICAL_RULES`` says which mesh axis each name is split over. A dimension that does not
divide evenly stays replicated, so every preset runs on any mesh shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genrec_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes), tried in order.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "exp": ("expert",),
    "codebook": (),
    "norm": (),
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve -1 (fill) and check that the axes multiply to the device count."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes {({a: v for a, v in sizes.items() if v != -1})} multiply to {fixed}, "
                f"which does not divide the {num_devices} devices present"
            )
        sizes[fill[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ConfigError(
            f"mesh: axes {sizes} multiply to {total} but {num_devices} devices are present; "
            "set one axis to -1 to absorb the rest (e.g. --mesh data=-1,tensor=2)"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    arr = np.array(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


def parse_mesh_arg(text: str) -> dict[str, int]:
    """``data=64,fsdp=8,tensor=4,expert=8`` -> dict (used by --mesh)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ConfigError(f"--mesh {text!r}: expected axis=size pairs like data=8,tensor=2")
        name, val = part.split("=", 1)
        if name not in MESH_AXES:
            raise ConfigError(f"--mesh: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        try:
            out[name] = int(val)
        except ValueError:
            raise ConfigError(f"--mesh: size of {name} must be an integer, got {val!r}") from None
    return out


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh_sizes: dict[str, int],
                    rules: dict[str, tuple[str, ...]] = LOGICAL_RULES) -> P:
    """PartitionSpec for one array: each logical axis takes its mesh axes if they divide the
    dimension and are not already used by an earlier dimension."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        chosen: list[str] = []
        for mesh_axis in rules.get(name, ()) if name else ():
            size = mesh_sizes.get(mesh_axis, 1)
            if size == 1 or mesh_axis in used:
                continue
            if dim % (math.prod(mesh_sizes[a] for a in chosen) * size) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return P(*spec)


def _axes_of(x: Any) -> tuple | None:
    if isinstance(x, nnx.Variable):
        return x.get_metadata().get("axes")
    return None


def state_specs(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """PartitionSpecs for an nnx.State (or any pytree of nnx.Variables / arrays), in the
    same tree structure (each Variable now holds its PartitionSpec)."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def one(x):
        axes = _axes_of(x)
        value = (x.get_value() if hasattr(x, "get_value") else x.value) if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", ())
        spec = P() if axes is None or len(axes) != len(shape) else logical_to_spec(axes, shape, sizes, rules)
        # Keep the Variable wrapper so the result has the state's exact tree structure.
        return x.replace(spec) if isinstance(x, nnx.Variable) else spec

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def _spec_entry(axes: list[str] | tuple[str, ...]) -> Any:
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def batch_axes(sizes: dict[str, int], batch_size: int | None = None) -> tuple[str, ...]:
    """The data-parallel mesh axes (of size > 1) the batch dimension is split over: the
    longest prefix of ``LOGICAL_RULES["batch"]`` whose product divides ``batch_size``."""
    axes = [a for a in LOGICAL_RULES["batch"] if sizes.get(a, 1) > 1]
    if batch_size is not None:
        while axes and batch_size % math.prod(sizes[a] for a in axes):
            axes.pop()
    return tuple(axes)


def batch_spec(mesh: Mesh, ndim: int, batch_size: int | None = None) -> P:
    """Split the leading (batch) dimension over the data-parallel axes."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    return P(_spec_entry(batch_axes(sizes, batch_size)), *([None] * (ndim - 1)))


def per_shard(fn: Callable, arrays: dict[str, jax.Array | None], dims: dict[str, tuple[str | None, ...]],
              out_dims: tuple) -> Any:
    """Run ``fn(**arrays)`` once per shard of the mesh being traced under (``jax.set_mesh``).

    For ops that XLA cannot split itself: a Triton kernel is an opaque custom call, and the
    MoE router's top-k and expert sort are global, so under a sharded ``jit`` XLA would
    gather their operands onto every device and run the whole batch there. ``dims`` names
    each array dimension ``"batch"``, ``"heads"`` or None (replicated); ``out_dims`` does the
    same for the output (a tuple of such tuples when ``fn`` returns a tuple). The batch is
    split over the data-parallel axes that divide it, heads over ``tensor`` when it divides
    them; ``fn`` must treat every batch row and head independently. Gradients of replicated
    inputs are summed over the shards. With no mesh, a one-device mesh, or nothing to split,
    ``fn`` runs as is. None entries of ``arrays`` are passed through as None.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(**arrays)
    sizes = dict(mesh.shape)
    present = {k: v for k, v in arrays.items() if v is not None}
    batch = next(v.shape[dims[k].index("batch")] for k, v in present.items() if "batch" in dims[k])
    heads = next((v.shape[dims[k].index("heads")] for k, v in present.items() if "heads" in dims[k]), None)
    split = {"batch": _spec_entry(batch_axes(sizes, batch))}
    t = sizes.get("tensor", 1)
    split["heads"] = "tensor" if t > 1 and heads is not None and heads % t == 0 else None
    if split["batch"] is None and split["heads"] is None:
        return fn(**arrays)

    def spec(names):
        if names and isinstance(names[0], tuple):  # several outputs
            return tuple(spec(x) for x in names)
        return P(*(split.get(n) if n else None for n in names))

    def body(local):
        return fn(**{**arrays, **local})

    in_specs = ({k: spec(dims[k]) for k in present},)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec(out_dims), check_vma=False)(present)


def data_parallel_size(mesh: Mesh) -> int:
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    return math.prod(sizes.get(a, 1) for a in LOGICAL_RULES["batch"])


def maybe_initialize_distributed() -> bool:
    """Join a multi-host job when the standard environment variables are set.

    Set ``GENREC_COORDINATOR`` (host:port of process 0), ``GENREC_NUM_PROCESSES`` and
    ``GENREC_PROCESS_ID`` on every host (or rely on jax's own cluster auto-detection,
    e.g. SLURM, by setting ``GENREC_DISTRIBUTED=1``). Returns True when initialised.
    """
    import os

    coord = os.environ.get("GENREC_COORDINATOR")
    if coord:
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["GENREC_NUM_PROCESSES"]),
            process_id=int(os.environ["GENREC_PROCESS_ID"]),
        )
        return True
    if os.environ.get("GENREC_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False

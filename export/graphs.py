"""The JAX functions the ONNX graphs are traced from, with their named inputs and outputs.

Each graph is a plain function of positional arrays that calls the model's own methods
(``encode``, ``extend``, ``tasks``, ``decoder.prefill`` / ``decode_step``), so the ONNX file is
what jax2onnx traces from the model, never a hand-written copy of it:

* ``encoder``: history -> encoder states, user embedding, retrieval logits and top-k, the
  per-layer HSTU K/V cache, and (with a semantic-ID decoder) the decoder's cross-attention
  K/V of the history (``decoder.prefill``).
* ``ranker``: history + candidate list -> multi-task scores. The history is encoded once
  with its K/V cache, then the candidates are scored against it with ``extend(...,
  candidates=True)`` (M-FALCON: each candidate sees the history and itself only).
* ``decode_step``: previous codes + self-attention cache + cross K/V + level -> next-code
  logits and the updated cache. ``level`` is an input: the per-level bodies (each level has
  its own input embedding and output head) are the model's ``decode_step(..., level=t)``,
  selected by nested ``lax.cond`` (ONNX ``If``), and the logits are padded to the largest
  codebook with -inf.

Symbolic axes: ``B`` batch, ``L`` history length, ``M`` candidates, ``W`` beams.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.data.types import TOKEN_ITEM

Dim = int | str


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ONNX name, shape (ints or symbolic names), numpy dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    doc: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "doc": self.doc}


@dataclasses.dataclass(frozen=True)
class DimRange:
    """The sizes a symbolic axis may take (TensorRT optimization profile: min / opt / max)."""

    min: int
    opt: int
    max: int

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclasses.dataclass
class GraphDef:
    name: str
    fn: Callable[..., tuple]  # positional arrays in ``inputs`` order -> outputs in ``outputs`` order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange]
    doc: str = ""
    _jit: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

    def example_shapes(self, sizes: dict[str, int]) -> list[tuple[int, ...]]:
        return [tuple(sizes[d] if isinstance(d, str) else d for d in t.shape) for t in self.inputs]


@dataclasses.dataclass(frozen=True)
class ExportLimits:
    """Axis ranges of the exported graphs (the TensorRT profiles and the manifest)."""

    max_batch: int = 64
    opt_batch: int = 16
    opt_candidates: int = 64
    max_candidates: int = 2048
    beam_width: int = 16
    top_k: int = 100  # retrieval top-k inside the encoder graph (TensorRT TopK needs K < 3840)
    logits_max_items: int = 1 << 16  # export full-catalogue logits only up to this many items


# --------------------------------------------------------------------------- model preparation


def _modules(model: nnx.Module):
    it = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    for _, m in it:
        yield m


def prepare_model(model: nnx.Module, dtype: str = "float32") -> nnx.Module:
    """An export copy of the model: pure-JAX attention (``backend="xla"``: there is no Triton
    in ONNX), the MoE's dense routing (same outputs as the sorted routings, whose shapes
depend on the batch size, which the exported graphs leave dynamic), and
    with ``dtype="float16"`` the model's reduced-precision mode at fp16 (float16 parameters
    and compute dtype; the model keeps its own fp32 islands: norm statistics, attention
    accumulation, logits). A model trained in bfloat16 exports with fp32 (or fp16) compute."""
    m = nnx.clone(model)
    for mod in _modules(m):
        if hasattr(mod, "backend"):
            mod.backend = "xla"
        if hasattr(mod, "routing") and getattr(mod, "routing") in ("dropless", "blocked"):
            mod.routing = "dense"
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    target = jnp.float16 if dtype == "float16" else jnp.float32
    if dtype == "float16":
        state = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda x: x.astype(jnp.float16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                   state))
    for mod in _modules(m):  # compute dtype (a bfloat16-trained model exports as fp32 / fp16 too)
        if getattr(mod, "dtype", None) is not None and mod.dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            mod.dtype = target
    return m


# --------------------------------------------------------------------------- shared pieces


def _history_inputs(model) -> list[TensorSpec]:
    specs = [
        TensorSpec("items", ("B", "L"), "int32", "item ids of the history, oldest first, 0-padded after `lengths`"),
        TensorSpec("actions", ("B", "L"), "int32", "action id of each event"),
        TensorSpec("timestamps", ("B", "L"), "int32", "event time in seconds relative to the row's first event"),
        TensorSpec("query_timestamps", ("B", "L"), "int32",
                   "time each token's prediction is made: the next event's time; for the last "
                   "event the request time (same origin)"),
        TensorSpec("lengths", ("B",), "int32", "valid events per row (1..L)"),
    ]
    ms = model.cfg.multiscale
    if ms.enabled:
        if ms.num_context_tokens:
            specs.append(TensorSpec("context", ("B", ms.num_context_tokens), "int32",
                                    "request-context ids (hour of day, weekday)"))
        if ms.user_profile_dim > 0:
            specs.append(TensorSpec("user_features", ("B", ms.user_profile_dim), "float32", "user profile vector"))
        w, win = ms.max_long_tokens, ms.long_window
        specs += [
            TensorSpec("long_items", ("B", w, win), "int32", "older events pooled in windows"),
            TensorSpec("long_actions", ("B", w, win), "int32", "actions of the pooled events"),
            TensorSpec("long_timestamps", ("B", w), "int32", "time of each window"),
            TensorSpec("num_long", ("B",), "int32", "valid windows per row"),
        ]
    return specs


def _batch(names: list[str], arrays: tuple) -> dict[str, jax.Array]:
    return dict(zip(names, arrays))


def _float_out(model) -> str:
    return "float16" if model.dtype == jnp.float16 else "float32"


def _axes_of(model, limits: ExportLimits) -> dict[str, DimRange]:
    return {
        "B": DimRange(1, min(limits.opt_batch, limits.max_batch), limits.max_batch),
        "L": DimRange(1, model.max_len, model.max_len),
    }


# --------------------------------------------------------------------------- encoder


def encoder_graph(model, limits: ExportLimits = ExportLimits()) -> GraphDef:
    inputs = _history_inputs(model)
    names = [t.name for t in inputs]
    n_items = model.num_items + 1
    with_logits = n_items <= limits.logits_max_items
    k = min(limits.top_k, model.num_items)
    cfg = model.cfg
    fdt = _float_out(model)
    hstu = cfg.arch == "hstu" and not cfg.multiscale.enabled  # caches of the event tokens only
    dec = getattr(model, "decoder", None)

    def fn(*arrays):
        batch = _batch(names, arrays)
        lengths = batch["lengths"]
        if hstu:
            states, _, caches = model.encode(batch, return_cache=True)
        else:
            states, _ = model.encode(batch)
            caches = None
        user = model.user_vectors(model.last_states(states, lengths))
        logits = model.score_items(user)  # [B, N + 1] float32
        masked = jnp.where(jnp.arange(n_items)[None, :] == 0, -jnp.inf, logits)  # item 0 is padding
        top_scores, top_items = jax.lax.top_k(masked, k)
        out = [states, user]
        if with_logits:
            out.append(logits)
        out += [top_scores, top_items.astype(jnp.int32)]
        if caches is not None:
            out += [jnp.stack([c.k for c in caches], axis=1), jnp.stack([c.v for c in caches], axis=1)]
        if dec is not None:
            cross = dec.prefill(states, lengths)
            out += [jnp.moveaxis(cross.k, 0, 1), jnp.moveaxis(cross.v, 0, 1), cross.valid]
        return tuple(out)

    d = cfg.embed_dim
    outputs = [
        TensorSpec("states", ("B", "L", d), fdt, "encoder states of the history tokens (after the final norm)"),
        TensorSpec("user_embedding", ("B", d), fdt,
                   "retrieval query: the last valid state (L2-normalised when model.l2_norm); score = "
                   "user_embedding . item_table[i] * logit_scale"),
    ]
    if with_logits:
        outputs.append(TensorSpec("retrieval_logits", ("B", n_items), "float32",
                                  "scores of every item id (column 0 = padding, not an item)"))
    outputs += [
        TensorSpec("topk_scores", ("B", k), "float32", "best retrieval scores, descending (no history exclusion)"),
        TensorSpec("topk_items", ("B", k), "int32", "item ids of topk_scores"),
    ]
    if hstu:
        nl, h = cfg.num_layers, cfg.num_heads
        outputs += [
            TensorSpec("hstu_k_cache", ("B", nl, "L", h, cfg.attn_dim), fdt,
                       "per-layer HSTU keys of the history (what Recommender.extend consumes)"),
            TensorSpec("hstu_v_cache", ("B", nl, "L", h, cfg.linear_dim), fdt, "per-layer HSTU values"),
        ]
    if dec is not None:
        dl, dh, dd = len(dec.blocks), dec.cfg.num_heads, dec.cfg.head_dim
        ddt = "float16" if dec.dtype == jnp.float16 else "float32"
        outputs += [
            TensorSpec("cross_k", ("B", dl, "L", dh, dd), ddt, "decoder cross-attention keys of the history"),
            TensorSpec("cross_v", ("B", dl, "L", dh, dd), ddt, "decoder cross-attention values of the history"),
            TensorSpec("cross_valid", ("B", "L"), "bool", "which memory slots are real (index < lengths)"),
        ]
    return GraphDef("encoder", fn, inputs, outputs, _axes_of(model, limits),
                    doc="history -> states, user embedding, retrieval logits/top-k, K/V caches")


# --------------------------------------------------------------------------- ranker


def unknown_action_id(model) -> int:
    """The "action unknown" id candidates carry (as in training and the serving engine)."""
    return model.num_actions if getattr(model, "action_emb", None) is not None else 0


def ranker_unsupported(model) -> str | None:
    """Why the ranker graph cannot be exported for this model (None when it can)."""
    if getattr(model, "tasks", None) is None:
        return "the model has no ranking heads (model.tasks.enabled=false)"
    if model.cfg.arch != "hstu" or model.cfg.multiscale.enabled:
        return "M-FALCON scoring against the cached history needs the HSTU encoder without the multi-scale prefix"
    return None


def ranker_graph(model, limits: ExportLimits = ExportLimits()) -> GraphDef:
    why = ranker_unsupported(model)
    if why:
        raise ValueError(f"cannot export the ranker: {why}")
    inputs = _history_inputs(model) + [
        TensorSpec("candidates", ("B", "M"), "int32", "item ids to score (0 = padding slot, its score is meaningless)"),
        TensorSpec("candidate_timestamp", ("B",), "int32",
                   "request time, same origin as `timestamps` (every candidate sits at it)"),
    ]
    names = [t.name for t in inputs]
    unknown_action = unknown_action_id(model)
    tasks = list(model.tasks.tasks)

    def fn(*arrays):
        batch = _batch(names, arrays)
        hist = {k: v for k, v in batch.items() if k not in ("candidates", "candidate_timestamp")}
        lengths, ts = hist["lengths"], hist["timestamps"]
        states, _, caches = model.encode(hist, return_cache=True)
        cands = batch["candidates"]
        b, m = cands.shape
        req = batch["candidate_timestamp"]
        cand_ts = jnp.broadcast_to(req[:, None], (b, m))
        # Candidate tokens as the serving engine builds them (serve/steps.py rank_step): the
        # "unknown" action, item token type, the request time as time and query time, and
        # the time gap measured from the last history event for every candidate (as in
        # training), so a candidate's scores do not depend on its place in the list.
        new = {
            "items": cands,
            "actions": jnp.zeros_like(cands) + unknown_action,
            "timestamps": cand_ts,
            "query_timestamps": cand_ts,
            "lengths": jnp.zeros_like(lengths) + m,
            "token_types": jnp.zeros_like(cands) + TOKEN_ITEM,
            "prev_timestamp": jnp.take_along_axis(ts, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0],
        }
        y, _ = model.extend(new, caches, lengths, ts, candidates=True)
        user = model.last_states(states, lengths)
        logits = model.tasks(y, model.item_emb(cands), user, None, backend="xla").astype(jnp.float32)
        u = model.user_vectors(user).astype(jnp.float32)
        item_vecs = jnp.take(model.item_table(), cands, axis=0).astype(jnp.float32)
        retrieval = jnp.einsum("bd,bmd->bm", u, item_vecs) * model.logit_scale()
        return logits, jax.nn.sigmoid(logits), retrieval

    t = len(tasks)
    outputs = [
        TensorSpec("task_logits", ("B", "M", t), "float32", f"one logit per task: {', '.join(tasks)}"),
        TensorSpec("task_scores", ("B", "M", t), "float32",
                   "sigmoid(task_logits): probabilities (watch: predicted watch ratio)"),
        TensorSpec("retrieval_logits", ("B", "M"), "float32", "the retrieval head's score of each candidate"),
    ]
    dims = _axes_of(model, limits)
    dims["M"] = DimRange(1, min(limits.opt_candidates, limits.max_candidates), limits.max_candidates)
    return GraphDef("ranker", fn, inputs, outputs, dims,
                    doc="history + candidates -> multi-task scores (M-FALCON)")


# --------------------------------------------------------------------------- decode step


def decode_step_graph(model, limits: ExportLimits = ExportLimits()) -> GraphDef:
    dec = getattr(model, "decoder", None)
    if dec is None:
        raise ValueError("cannot export decode_step: the model has no semantic-ID decoder "
                         "(model.decoder.enabled=false)")
    sizes = dec.code_sizes
    num_levels, k_max = len(sizes), max(sizes)
    dl, dh, dd = len(dec.blocks), dec.cfg.num_heads, dec.cfg.head_dim
    ddt = "float16" if dec.dtype == jnp.float16 else "float32"
    from genrec_jax.semantic_ids.decoder import CrossKV, SelfKVCache

    def fn(prev_codes, level, self_k, self_v, cross_k, cross_v, cross_valid):
        def branch(t):
            def run(prev, self_k, self_v, cross_k, cross_v, cross_valid):
                # Graph I/O is batch-first (Triton batches dim 0); the decoder stacks layers
                # first. (Everything happens inside the branch: jax2onnx 0.17 drops outer
                # nodes whose only consumers are If bodies.)
                cross = CrossKV(jnp.moveaxis(cross_k, 1, 0), jnp.moveaxis(cross_v, 1, 0), cross_valid)
                cache = SelfKVCache(jnp.moveaxis(self_k, 1, 0), jnp.moveaxis(self_v, 1, 0))
                logits, new = dec.decode_step(prev, t, cache, cross)
                pad = k_max - logits.shape[-1]
                if pad:
                    fill = jnp.full(logits.shape[:-1] + (pad,), -jnp.inf, logits.dtype)
                    logits = jnp.concatenate([logits, fill], axis=-1)
                return logits, jnp.moveaxis(new.k, 0, 1), jnp.moveaxis(new.v, 0, 1)
            return run

        lvl = level.reshape(())

        def from_level(t):  # if level == t: body t, else: from_level(t + 1) (jax2onnx: two-way If)
            if t == num_levels - 1:
                return branch(t)
            return lambda *ops: jax.lax.cond(lvl == t, branch(t), from_level(t + 1), *ops)

        return from_level(0)(prev_codes, self_k, self_v, cross_k, cross_v, cross_valid)

    inputs = [
        TensorSpec("prev_codes", ("B", "W"), "int32", "code chosen at level - 1 for each beam (ignored at level 0)"),
        TensorSpec("level", (1,), "int32", f"the level to decode, 0..{num_levels - 1} (the cache's valid length)"),
        TensorSpec("self_k", ("B", dl, "W", num_levels, dh, dd), ddt,
                   "decoder self-attention keys; slots < level are valid (zeros at level 0)"),
        TensorSpec("self_v", ("B", dl, "W", num_levels, dh, dd), ddt, "decoder self-attention values"),
        TensorSpec("cross_k", ("B", dl, "L", dh, dd), ddt, "encoder.onnx output cross_k"),
        TensorSpec("cross_v", ("B", dl, "L", dh, dd), ddt, "encoder.onnx output cross_v"),
        TensorSpec("cross_valid", ("B", "L"), "bool", "encoder.onnx output cross_valid"),
    ]
    outputs = [
        TensorSpec("logits", ("B", "W", k_max), "float32",
                   f"next-code logits of `level`; codebook sizes {list(sizes)}, entries past the level's "
                   "size are -inf"),
        TensorSpec("new_self_k", ("B", dl, "W", num_levels, dh, dd), ddt, "self_k with slot `level` written"),
        TensorSpec("new_self_v", ("B", dl, "W", num_levels, dh, dd), ddt, "self_v with slot `level` written"),
    ]
    dims = _axes_of(model, limits)
    dims["W"] = DimRange(1, limits.beam_width, limits.beam_width)
    return GraphDef("decode_step", fn, inputs, outputs, dims,
                    doc="previous codes + KV cache -> next-code logits + updated cache (one beam-search level)")


# --------------------------------------------------------------------------- all graphs


def build_graphs(model, limits: ExportLimits = ExportLimits()) -> tuple[list[GraphDef], dict[str, str]]:
    """Every graph this model supports, and why the others are skipped."""
    graphs, skipped = [encoder_graph(model, limits)], {}
    why = ranker_unsupported(model)
    if why is None:
        graphs.append(ranker_graph(model, limits))
    else:
        skipped["ranker"] = why
    if getattr(model, "decoder", None) is not None:
        graphs.append(decode_step_graph(model, limits))
    else:
        skipped["decode_step"] = "the model has no semantic-ID decoder (model.decoder.enabled=false)"
    return graphs, skipped


def random_inputs(graph: GraphDef, model, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random but valid inputs of a graph (ids in range, lengths >= 1, monotone times)."""
    out: dict[str, np.ndarray] = {}
    shapes = dict(zip([t.name for t in graph.inputs], graph.example_shapes(sizes)))
    b = sizes["B"]
    for spec in graph.inputs:
        shape = shapes[spec.name]
        n = spec.name
        if n in ("items", "candidates", "long_items"):
            a = rng.integers(1, model.num_items + 1, shape)
        elif n in ("actions", "long_actions"):
            a = rng.integers(0, model.num_actions, shape)
        elif n == "timestamps":
            a = np.cumsum(rng.integers(0, 200_000, shape), axis=1)
            a -= a[:, :1]
        elif n == "query_timestamps":
            ts = out["timestamps"]
            a = np.concatenate([ts[:, 1:], ts[:, -1:] + rng.integers(0, 50_000, (b, 1))], axis=1)
        elif n == "lengths":
            a = rng.integers(1, sizes["L"] + 1, shape)
            a[0] = sizes["L"]
        elif n == "candidate_timestamp":
            a = out["query_timestamps"][np.arange(b), out["lengths"] - 1] + rng.integers(0, 1000, shape)
        elif n == "context":
            a = rng.integers(0, 7, shape)
        elif n == "long_timestamps":
            a = np.zeros(shape)
        elif n == "num_long":
            a = rng.integers(0, model.cfg.multiscale.max_long_tokens + 1, shape)
        elif n == "prev_codes":
            a = rng.integers(0, min(model.decoder.code_sizes), shape)
        elif n == "level":
            a = np.array([rng.integers(0, model.decoder.num_levels)])
        elif n == "cross_valid":
            ln = rng.integers(1, sizes["L"] + 1, (b,))
            a = np.arange(sizes["L"])[None, :] < ln[:, None]
        elif spec.dtype.startswith("float"):
            a = rng.standard_normal(shape)
        else:
            raise ValueError(f"no random generator for input {n!r}")
        out[n] = np.asarray(a).astype(spec.dtype)
    if "lengths" in out:  # zero the padding like collate does
        valid = np.arange(sizes["L"])[None, :] < out["lengths"][:, None]
        for n in ("items", "actions", "timestamps", "query_timestamps"):
            out[n] = np.where(valid, out[n], 0).astype(np.int32)
    return out


def reference(graph: GraphDef, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The JAX outputs of a graph on numpy inputs (jitted once per input shape)."""
    args = [jnp.asarray(feeds[t.name]) for t in graph.inputs]
    if graph._jit is None:
        graph._jit = jax.jit(graph.fn)
    outs = graph._jit(*args)
    return [np.asarray(o) for o in outs]


def abstract_inputs(graph: GraphDef) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(t.shape, np.dtype(t.dtype)) for t in graph.inputs]


__all__ = ["TensorSpec", "DimRange", "GraphDef", "ExportLimits", "prepare_model", "encoder_graph", "ranker_graph",
           "decode_step_graph", "build_graphs", "random_inputs", "reference", "abstract_inputs", "ranker_unsupported"]

"""Reference client: the whole recommendation from an export directory, in ONNX Runtime.

NumPy and onnxruntime only (no JAX), so it doubles as the executable specification of what
a serving stack (Triton, a C++ service) has to do around the graphs:

    client = OnnxRecommender("export/tiny")                  # reads manifest.json
    enc = client.encode(batch)                               # encoder.onnx
    items, scores = client.retrieve(batch, k=10)             # top-k by the retrieval head
    items, scores = client.recommend(batch, k=10)            # encoder + beam search over
                                                             # decode_step.onnx with the trie
    scores = client.rank(batch, candidates, request_time)    # ranker.onnx

``batch`` holds the history arrays named in the manifest (items, actions, timestamps,
query_timestamps, lengths; all int32 [B, L] / [B]) -- ``collate_eval``'s output has them.

Beam search (the same algorithm as ``genrec_jax.semantic_ids.beam_search``): W beams per
row, one ``decode_step`` per level; at level t every live beam is extended by the codes
its trie node allows (read from the CSR arrays of ``side/trie.safetensors``), a
hypothesis' score is the sum of its codes' log-softmax, the best W survive (the best k at
the last level), and the self-attention cache follows its beams (gathered along W). A
repeat-aware decoder (manifest ``model.repeat_bias``) adds ``repeat_bias[t]`` to the level-t
logits of the codes that continue a beam's prefix into one of the row's history items
(their semantic IDs from ``side/item_codes.npy``); with ``model.repeat_mode`` "item" only
where that child holds the history item alone (``prefix_sizes`` == 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

HISTORY_INPUTS = ("items", "actions", "timestamps", "query_timestamps", "lengths")


class TrieArrays:
    """The trie's CSR arrays (``onnx_export.save_trie``) with the two queries beam search uses."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        t = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        self.code_sizes = tuple(json.loads(meta["code_sizes"]))
        self.max_fanout = tuple(json.loads(meta["max_fanout"]))
        self.num_levels = len(self.code_sizes)
        self.child_ptr = [t[f"child_ptr_{d}"].astype(np.int64) for d in range(self.num_levels)]
        self.child_code = [t[f"child_code_{d}"].astype(np.int64) for d in range(self.num_levels)]
        self.leaf_item = t["leaf_item"].astype(np.int64)
        self.dense_mask = [t.get(f"dense_mask_{d}") for d in range(self.num_levels)]

    def children(self, level: int, node: np.ndarray):
        """(codes, next node -- item id at the last level --, valid), each [..., max_fanout]."""
        f = self.max_fanout[level]
        ptr = self.child_ptr[level]
        start, stop = ptr[node], ptr[node + 1]
        idx = start[..., None] + np.arange(f)
        valid = idx < stop[..., None]
        idx = np.where(valid, idx, 0)
        codes = self.child_code[level][idx]
        nxt = self.leaf_item[idx] if level == self.num_levels - 1 else idx
        return np.where(valid, codes, 0), np.where(valid, nxt, 0), valid

    def allowed_mask(self, level: int, node: np.ndarray) -> np.ndarray:
        if self.dense_mask[level] is not None:
            return self.dense_mask[level][node].astype(bool)
        codes, _, valid = self.children(level, node)
        f = codes.shape[-1]
        flat = codes.reshape(-1, f)
        mask = np.zeros((flat.shape[0], self.code_sizes[level]), bool)
        np.logical_or.at(mask, (np.repeat(np.arange(flat.shape[0]), f), flat.ravel()), valid.ravel())
        return mask.reshape(node.shape + (self.code_sizes[level],))


def prefix_sizes(item_codes: np.ndarray) -> np.ndarray:
    """int32 [N + 1, L]: how many items (rows 1..N) share each item's first t + 1 codes
    (row 0, padding: 0) -- a history item marks level t in "item" mode where this is 1."""
    codes = np.asarray(item_codes)[1:]
    out = np.zeros((len(codes) + 1, codes.shape[1]), np.int32)
    for t in range(codes.shape[1]):
        _, inv, cnt = np.unique(codes[:, :t + 1], axis=0, return_inverse=True, return_counts=True)
        out[1:, t] = cnt[inv.reshape(-1)]
    return out


def repeat_inputs(bias, mode: str, item_codes: np.ndarray, items: np.ndarray, sizes: np.ndarray | None = None):
    """The ``history`` argument of :func:`beam_search` for history item ids ``items`` [B, N]
    (0 = none): (bias [L], codes [B, N, L], valid [B, N], marks [B, N, L] or None)."""
    items = np.asarray(items, np.int64)
    marks = None
    if mode == "item":
        sizes = prefix_sizes(item_codes) if sizes is None else sizes
        marks = sizes[items] == 1
    return np.asarray(bias, np.float32), item_codes[items], items > 0, marks


def _marked_codes(match: np.ndarray, codes: np.ndarray, level: int, size: int) -> np.ndarray:
    """bool [B, W, size]: codes at ``level`` of the items (codes [B, N, L]) a beam matches."""
    b, w, n = match.shape
    out = np.zeros((b, w, size), bool)
    idx = np.broadcast_to(codes[:, None, :, level], (b, w, n))
    np.logical_or.at(out, (np.arange(b)[:, None, None], np.arange(w)[None, :, None], idx), match)
    return out


def _follow(match: np.ndarray, parent: np.ndarray, codes: np.ndarray, level: int, chosen: np.ndarray) -> np.ndarray:
    """Per-beam prefix match after a level: the parent's, and the code chosen at ``level``."""
    return np.take_along_axis(match, parent[..., None], axis=1) & (codes[:, None, :, level] == chosen[..., None])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest k along the last axis, ties to the lower index (as ``jax.lax.top_k``)."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx


class OnnxRecommender:
    """Runs an export directory's graphs in ONNX Runtime (CPU unless ``providers`` say otherwise)."""

    def __init__(self, export_dir: str | Path, precision: str = "fp32", threads: int = 1,
                 providers: list[str] | None = None):
        from genrec_jax.export.manifest import read_manifest

        self.dir = Path(export_dir)
        self.manifest = read_manifest(self.dir)
        self.precision = precision
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, object] = {}
        self._trie: TrieArrays | None = None
        self._item_codes: np.ndarray | None = None
        self._prefix_sizes: np.ndarray | None = None

    # ------------------------------------------------------------------ plumbing

    def session(self, graph: str):
        if graph not in self._sessions:
            import onnxruntime as ort

            if graph not in self.manifest.graphs:
                why = self.manifest.skipped.get(graph, "not exported")
                raise KeyError(f"{graph}.onnx is not in {self.dir}: {why}")
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            path = self.dir / self.manifest.graphs[graph].path(self.precision)
            self._sessions[graph] = ort.InferenceSession(str(path), so, providers=self.providers)
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph on named inputs (cast to the manifest's dtypes); outputs by name."""
        ins, outs = self.manifest.graphs[graph].io(self.precision)
        missing = [t["name"] for t in ins if t["name"] not in feeds]
        if missing:
            raise KeyError(f"{graph} needs inputs {missing}")
        run_feeds = {t["name"]: np.ascontiguousarray(feeds[t["name"]], dtype=t["dtype"]) for t in ins}
        names = [t["name"] for t in outs]
        return dict(zip(names, self.session(graph).run(names, run_feeds)))

    @property
    def trie(self) -> TrieArrays:
        if self._trie is None:
            entry = self.manifest.side_files.get("trie")
            if entry is None:
                raise KeyError("this export has no trie (the model has no semantic-ID decoder)")
            self._trie = TrieArrays(self.dir / entry["file"])
        return self._trie

    def _codes(self) -> tuple[np.ndarray, np.ndarray]:
        """The item -> semantic ID side file and its prefix sizes (loaded once)."""
        if self._item_codes is None:
            self._item_codes = np.load(self.dir / self.manifest.side_files["item_codes"]["file"])
            self._prefix_sizes = prefix_sizes(self._item_codes)
        return self._item_codes, self._prefix_sizes

    def repeat_history(self, batch: dict[str, np.ndarray]):
        """``beam_search``'s ``history`` for a repeat-aware decoder (``repeat_inputs``), else None."""
        bias = self.manifest.model.get("repeat_bias")
        if bias is None:
            return None
        codes, sizes = self._codes()
        return repeat_inputs(bias, self.manifest.model.get("repeat_mode", "prefix"), codes, batch["items"], sizes)

    def exclusion(self, exclude: list[np.ndarray]):
        """``beam_search``'s ``exclude`` for per-row item id lists."""
        codes, sizes = self._codes()
        width = max([len(e) for e in exclude] + [1])
        ids = np.zeros((len(exclude), width), np.int64)
        for r, e in enumerate(exclude):
            ids[r, :len(e)] = np.asarray(e, np.int64)
        _, xcodes, valid, marks = repeat_inputs((), "item", codes, ids, sizes)
        return xcodes, valid, marks

    def history(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, _ = self.manifest.graphs["encoder"].io(self.precision)
        return {t["name"]: np.asarray(batch[t["name"]]) for t in ins}

    # ------------------------------------------------------------------ the recommendation

    def encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run("encoder", self.history(batch))

    def retrieve(self, batch: dict[str, np.ndarray], k: int, exclude: list[np.ndarray] | None = None,
                 encoded: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by the retrieval head: (item ids int32 [B, k], scores [B, k]).

        Without ``exclude`` the encoder's own TopK output is used when it is wide enough;
        ``exclude`` (per row, item ids never to return, e.g. the history) scores the item
        table instead.
        """
        enc = encoded if encoded is not None else self.encode(batch)
        if exclude is None and "topk_items" in enc and enc["topk_items"].shape[1] >= k:
            return enc["topk_items"][:, :k].astype(np.int32), enc["topk_scores"][:, :k]
        scores = self.item_scores(enc)
        scores[:, 0] = -np.inf
        for r, ex in enumerate(exclude or []):
            scores[r, np.asarray(ex, np.int64)] = -np.inf
        s, i = top_k(scores, k)
        return i.astype(np.int32), s

    def item_scores(self, enc: dict[str, np.ndarray]) -> np.ndarray:
        if "retrieval_logits" in enc:
            return enc["retrieval_logits"].astype(np.float32).copy()
        table = np.load(self.dir / self.manifest.side_files["item_table"]["file"])
        return enc["user_embedding"].astype(np.float32) @ table.T * self.manifest.model["logit_scale"]

    def recommend(self, batch: dict[str, np.ndarray], k: int, beam_width: int | None = None,
                  exclude: list[np.ndarray] | None = None, renormalize: bool = False,
                  encoded: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Generative recommendation: encoder, then trie-constrained beam search over
        ``decode_step`` with ``beam_width`` (default k) beams kept to the end; excluded items
        (per row) are dropped inside the search where their paths become unique, and from
        the final beams, and the best k remain, as the serving engine does. Returns (item ids
        int32 [B, k], log-prob scores [B, k]); slots with no valid item are item 0 with score
        -inf."""
        w = beam_width or k
        if k > w:
            raise ValueError(f"beam_width ({w}) must be >= k ({k})")
        enc = encoded if encoded is not None else self.encode(batch)
        items, scores = self.beam_search(enc, k=w, beam_width=w, renormalize=renormalize,
                                         history=self.repeat_history(batch),
                                         exclude=self.exclusion(exclude) if exclude else None)
        hit = items == 0
        for r, ex in enumerate(exclude or []):
            hit[r] |= np.isin(items[r], np.asarray(ex))
        scores = np.where(hit, -np.inf, scores).astype(np.float32)
        top, order = top_k(scores, k)
        items = np.take_along_axis(items, order, axis=1)
        return np.where(np.isfinite(top), items, 0).astype(np.int32), top

    def beam_search(self, enc: dict[str, np.ndarray], *, k: int, beam_width: int,
                    renormalize: bool = False, history=None, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        if history is None and self.manifest.model.get("repeat_bias") is not None:
            raise ValueError("this export's decoder is repeat-aware: pass history= (see repeat_history)")
        ins, _ = self.manifest.graphs["decode_step"].io(self.precision)
        return beam_search(lambda feeds: self.run("decode_step", feeds), self.trie, enc, {t["name"]: t for t in ins},
                           k=k, beam_width=beam_width, renormalize=renormalize, history=history, exclude=exclude)

    def rank(self, batch: dict[str, np.ndarray], candidates: np.ndarray,
             candidate_timestamp: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of ``candidates`` int32 [B, M] at the request time [B] (same origin as the
        timestamps): {"task_scores", "task_logits": [B, M, T] (tasks in
        manifest.model["tasks"]), "retrieval_logits": [B, M]}."""
        feeds = self.history(batch)
        feeds.update(candidates=np.asarray(candidates), candidate_timestamp=np.asarray(candidate_timestamp))
        return self.run("ranker", feeds)


def beam_search(run_decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], trie: TrieArrays,
                enc: dict[str, np.ndarray], decode_inputs: dict[str, dict], *, k: int, beam_width: int,
                renormalize: bool = False, history=None, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Trie-constrained beam search driving a ``decode_step`` graph through ``run_decode``
    (ONNX Runtime here, a Triton BLS call in the generated ``recommend`` model).

    ``enc``: the encoder outputs (cross_k, cross_v, cross_valid); ``decode_inputs``: the
    manifest's decode_step input specs by name; ``history``: (repeat_bias [L], history codes
    [B, N, L], valid [B, N], marks [B, N, L] or None; see ``repeat_inputs``) for a
    repeat-aware decoder; ``exclude``: (codes [B, E, L], valid [B, E], unique marks [B, E, L])
    of items dropped where their paths become unique (``OnnxRecommender.exclusion``).
    Returns (items int32 [B, k], scores [B, k]).
    """
    if k > beam_width:
        raise ValueError(f"beam_width ({beam_width}) must be >= k ({k})")
    spec = decode_inputs
    # cache [B, layers, W, levels, H, hd] (batch-first, like every graph tensor)
    cross_k, cross_v, cross_valid = enc["cross_k"], enc["cross_v"], enc["cross_valid"]
    b, w = cross_k.shape[0], beam_width
    cache_shape = (b, spec["self_k"]["shape"][1], w) + tuple(spec["self_k"]["shape"][3:])
    self_k = np.zeros(cache_shape, spec["self_k"]["dtype"])
    self_v = np.zeros(cache_shape, spec["self_v"]["dtype"])
    node = np.zeros((b, w), np.int64)
    prev = np.zeros((b, w), np.int64)
    score = np.where(np.arange(w)[None, :] == 0, 0.0, -np.inf) * np.ones((b, 1), np.float32)
    score = score.astype(np.float32)
    levels = trie.num_levels
    if history is not None:
        bias, hcodes, hvalid, marks = history
        match = np.broadcast_to(np.asarray(hvalid, bool)[:, None, :], (b, w, hvalid.shape[1]))  # [B, W, N]
    if exclude is not None:
        xcodes, xvalid, xmarks = exclude
        xmatch = np.broadcast_to(np.asarray(xvalid, bool)[:, None, :], (b, w, xvalid.shape[1]))  # [B, W, E]
    for level in range(levels):
        out = run_decode({
            "prev_codes": prev.astype(np.int32), "level": np.array([level], np.int32),
            "self_k": self_k, "self_v": self_v,
            "cross_k": cross_k, "cross_v": cross_v, "cross_valid": cross_valid})
        self_k, self_v = out["new_self_k"], out["new_self_v"]
        logits = out["logits"][..., :trie.code_sizes[level]]
        if history is not None:
            m = match if marks is None else match & marks[:, None, :, level]
            logits = logits + np.float32(bias[level]) * _marked_codes(m, hcodes, level, trie.code_sizes[level])
        if renormalize:
            logits = np.where(trie.allowed_mask(level, node), logits, -np.inf)
        logp = log_softmax(logits)
        codes, nxt, valid = trie.children(level, node)  # [B, W, F]
        f = codes.shape[-1]
        if exclude is not None:
            banned = _marked_codes(xmatch & xmarks[:, None, :, level], xcodes, level, trie.code_sizes[level])
            valid = valid & ~np.take_along_axis(banned, codes, axis=-1)
        with np.errstate(invalid="ignore"):
            cand = score[..., None] + np.take_along_axis(logp, codes, axis=-1)
        cand = np.where(valid & np.isfinite(score)[..., None], cand, -np.inf).reshape(b, w * f)
        width = w if level < levels - 1 else k
        take = min(width, w * f)
        top, idx = top_k(cand, take)
        if take < width:
            top = np.concatenate([top, np.full((b, width - take), -np.inf, top.dtype)], axis=1)
            idx = np.concatenate([idx, np.zeros((b, width - take), idx.dtype)], axis=1)
        alive = np.isfinite(top)
        parent = idx // f
        prev = np.where(alive, np.take_along_axis(codes.reshape(b, w * f), idx, axis=1), 0)
        node = np.where(alive, np.take_along_axis(nxt.reshape(b, w * f), idx, axis=1), 0)
        score = top.astype(np.float32)
        if level < levels - 1 and history is not None:
            match = _follow(match, parent, hcodes, level, prev)
        if level < levels - 1 and exclude is not None:
            xmatch = _follow(xmatch, parent, xcodes, level, prev)
        if level < levels - 1:
            sel = parent[:, None, :, None, None, None]
            self_k = np.take_along_axis(self_k, sel, axis=2)
            self_v = np.take_along_axis(self_v, sel, axis=2)
    return np.where(np.isfinite(score), node, 0).astype(np.int32), score

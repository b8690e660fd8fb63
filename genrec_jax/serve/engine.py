"""The serving engine: a trained checkpoint turned into compiled recommend / rank calls.

No HTTP here. The engine

* loads a run directory (config, params, item table, semantic IDs), keeps the params on
  one device in float32 or bfloat16 (``serve.param_dtype``);
* compiles, at start, one executable per (step, batch bucket, sequence bucket) -- see
  ``steps.py`` -- so no request ever waits on a compile;
* pads each batch into buckets and runs it: encode (prefill for new windows, extend for
  returning users whose K/V prefix is cached), then the heads (retrieval top-k, beam
  search, or M-FALCON ranking);
* keeps a per-user prefix cache (``prefix_cache.py``) in a device slot pool with LRU
  eviction and hit-rate counters.

It is not thread-safe by design: one caller (the batcher's worker thread) drives it; a
lock makes concurrent in-process use safe but serial.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.config import Config, ServeConfig
from genrec_jax.model.recommender import l2_normalize
from genrec_jax.serve import steps
from genrec_jax.serve.errors import Conflict, NotReady, RequestError
from genrec_jax.serve.generative import SemanticSide
from genrec_jax.serve.inputs import Catalog, History, chunks, pad_batch, parse_history, pick_bucket
from genrec_jax.serve.prefix_cache import PrefixCache

log = logging.getLogger("genrec_jax.serve")

MODES = ("retrieval", "generative")
HEADS = ("retrieval", "rank", "generative")


# --------------------------------------------------------------------------- jobs and results


@dataclasses.dataclass
class RecommendJob:
    history: History
    k: int
    mode: str = "retrieval"
    exclude: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # internal ids
    user_id: str | None = None


@dataclasses.dataclass
class RankJob:
    history: History
    candidates: np.ndarray  # int32 [C] internal ids
    user_id: str | None = None


@dataclasses.dataclass
class Recommendation:
    items: np.ndarray  # int32 [<= k] internal ids, best first
    scores: np.ndarray  # float32 [<= k]: retrieval logits, or beam log-probabilities


@dataclasses.dataclass
class RankScores:
    scores: dict[str, np.ndarray]  # name -> float32 [C]: task probabilities and "retrieval" logits


Job = RecommendJob | RankJob


@dataclasses.dataclass
class _Row:
    """One job's passage through the encoder."""

    job: int
    window: History
    slot: int
    start: int  # tokens reused from the slot's cached prefix
    user_id: str | None  # set when the slot belongs to this user (commit on success)


@dataclasses.dataclass
class _Chunk:
    """One pass's dispatched steps: (kind, rows, device outputs) of the top-k steps and
    (pieces, device outputs) of the rank steps."""

    jobs: Sequence[Job]
    rows: list[_Row]
    pending: list
    ranked: list


@dataclasses.dataclass
class _Pending:
    """What ``Engine.dispatch`` hands to ``Engine.collect``."""

    t0: float
    chunks: list[_Chunk] = dataclasses.field(default_factory=list)


_NO_EXCLUDE = np.zeros(0, np.int32)  # shared by requests that exclude nothing (read-only)
_NO_EXCLUDE.flags.writeable = False


def rank_buckets(micro_batch: int, max_candidates: int) -> list[int]:
    """Candidate micro-batch widths: micro_batch / 16, / 4 and itself (the smaller ones
    only when >= 8 candidates wide: below that a narrower call saves nothing)."""
    top = max(1, min(micro_batch, max_candidates))
    return sorted({top} | {w for w in (top // 16, top // 4) if w >= 8})


# --------------------------------------------------------------------------- the engine


class Engine:
    """Compiled recommend / rank over one trained model.

    Args:
        model: a ``Recommender`` (HSTU encoder without the multi-scale prefix: the prefix
            cache and M-FALCON run through ``Recommender.extend``).
        catalog: external <-> internal item ids and action names.
        serve_cfg: buckets, limits, cache sizes (``ServeConfig``).
        model_version: reported with every answer.
        semantic_dir: the run's ``semantic_ids/`` folder (RQ-VAE for cold start), if any.
        item_popularity: training interaction count per internal item id [N + 1] (cold-start
            placement without a decoder), if the run saved it.
        warmup: compile every executable now (else call ``warmup()``).
        compiler_options: XLA options for every compile (tests use a low optimisation level).
        heads: which heads to compile and serve ("retrieval", "rank", "generative"); a
            deployment that only ranks starts faster without the others.
    """

    def __init__(self, model, catalog: Catalog, serve_cfg: ServeConfig, *, model_version: str = "unversioned",
                 semantic_dir: Path | None = None, warmup: bool = True, device=None,
                 compiler_options: dict | None = None, heads: Sequence[str] = HEADS,
                 item_popularity: np.ndarray | None = None):
        if model.cfg.arch != "hstu" or model.cfg.multiscale.enabled:
            raise ValueError("serving needs the HSTU encoder without the multi-scale prefix (model.arch=hstu, "
                             "model.multiscale.enabled=false): the prefix cache and M-FALCON ranking run on "
                             "incremental encoding")
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown head(s) {sorted(unknown)}; choose from {HEADS}")
        self.heads = tuple(heads)
        self.cfg = serve_cfg
        self.catalog = catalog
        self.model_version = model_version
        self.device = device or jax.devices()[0]
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)
        self.max_len = int(model.max_len)
        self.num_items = int(model.num_items)
        self.num_actions = int(model.num_actions)
        self.unknown_action = self.num_actions if model.action_emb is not None else 0
        self.task_names = tuple(model.tasks.tasks) if model.tasks is not None else ()
        self.semantic = SemanticSide(model, semantic_dir, item_popularity)
        # Buckets (each a compiled shape).
        self.batch_buckets = sorted(set(serve_cfg.batch_buckets))
        self.max_batch = self.batch_buckets[-1]
        self.seq_buckets = sorted({min(s, self.max_len) for s in serve_cfg.seq_buckets} | {self.max_len})
        self.extend_buckets = sorted({min(m, self.max_len) for m in serve_cfg.extend_buckets})
        self.rank_buckets = rank_buckets(serve_cfg.rank_micro_batch, serve_cfg.max_candidates)
        self.top_k = min(serve_cfg.max_k, self.num_items)
        # The item table has room for cold-start items (so registering one compiles nothing);
        # rows past ``live_items`` are masked out of retrieval.
        self.item_capacity = self.num_items + serve_cfg.cold_start_capacity
        self.live_items = self.num_items
        self.beam_width = serve_cfg.beam_width
        self.exclude_width = serve_cfg.max_exclude
        # Parameters on the device, in the storage dtype.
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        store = jnp.bfloat16 if serve_cfg.param_dtype == "bfloat16" else jnp.float32
        pad = serve_cfg.cold_start_capacity
        params = map_item_embedding(params, lambda e: jnp.pad(e, ((0, pad), (0, 0))))
        params = jax.tree.map(lambda p: p.astype(store) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        leaves, treedef = jax.tree.flatten((params, rest))
        self.weights = jax.device_put(leaves, self.sharding)
        self.item_table = jax.device_put(jnp.pad(model.item_table(), ((0, pad), (0, 0))).astype(store), self.sharding)
        self._l2_norm = model.cfg.l2_norm
        self._fn = steps.ModelFn(graphdef, treedef)
        self._model = model
        # Slot pool: 0 = filler rows, 1..max_batch = this batch's anonymous rows, then users.
        self.capacity = self.max_len + self.extend_buckets[-1]
        kv_dtype = model.dtype
        with_states = self.semantic.can_generate
        one = steps.pool_bytes(steps.pool_shapes(model, 1, self.capacity, kv_dtype, with_states))
        users = min(serve_cfg.prefix_cache_users, int(serve_cfg.prefix_cache_mb * 2**20 // one))
        if 0 < users < self.max_batch:  # a batch's users must never evict each other
            users = self.max_batch
        self.first_user_slot = 1 + self.max_batch
        self.prefix = PrefixCache(users, self.first_user_slot)
        self._pool_shapes = steps.pool_shapes(model, self.first_user_slot + users, self.capacity, kv_dtype,
                                              with_states)
        self.pool_bytes = steps.pool_bytes(self._pool_shapes)
        self._pool = self._new_pool()
        self._exec: dict[tuple, Any] = {}
        self._gen: tuple[Any, dict] | None = None  # (trie on device, {B: executable})
        self._register_lock = threading.Lock()
        self.compiler_options = compiler_options
        self._lock = threading.RLock()
        self.ready = False
        self.compiles = 0
        self.compile_seconds = 0.0
        self.on_call: Callable[[str, int, int], None] | None = None  # (step, rows, bucket) -> None
        # Host time per phase (seconds, summed over batches) while a dict: "dispatch" (the
        # executable calls, inputs to the device), "wait" (until the outputs are ready),
        # "fetch" (their copies to the host), "results" (building the answers), "total".
        self.host_spans: dict[str, float] | None = None
        self._no_exclude: dict[int, jax.Array] = {}  # [B, max_exclude] zeros on the device
        self._no_exclusion_codes: dict[int, tuple] = {}  # the same for the generative step's excluded codes
        if warmup:
            self.warmup()

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, run_dir: str | Path, overrides: Sequence[str] = (), *, warmup: bool = True,
                        step: int | None = None, compiler_options: dict | None = None) -> "Engine":
        """Load a ``python train.py`` run directory. ``overrides``: ``serve.*=value`` strings
        applied over the run's own config (buckets, limits, param dtype)."""
        from genrec_jax.train.restore import load_trained

        run_dir = Path(run_dir)
        tm = load_trained(run_dir, step=step)
        cfg = _apply_serve_overrides(tm.cfg, overrides)
        catalog = Catalog(tm.item_ids, tm.info.get("action_names", ()))
        sem = run_dir / "semantic_ids"
        if tm.cfg.model.decoder.codes_dir:
            sem = Path(tm.cfg.model.decoder.codes_dir)
        version = f"{run_dir.resolve().name}@{tm.step}"
        return cls(tm.model, catalog, cfg.serve, model_version=version, semantic_dir=sem if sem.exists() else None,
                   warmup=warmup, compiler_options=compiler_options, item_popularity=tm.item_popularity)

    # ----------------------------------------------------------------- compiling

    def _new_pool(self) -> steps.Pool:
        return jax.device_put(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._pool_shapes), self.sharding)

    def _compile(self, fn: Callable, args: tuple, donate: tuple[int, ...] = ()):
        t0 = time.perf_counter()
        exe = steps.compile_step(fn, args, self.sharding, donate, self.compiler_options)
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - t0
        return exe

    def executables(self) -> list[tuple]:
        """The (step, shape...) keys compiled at warm-up."""
        keys = [("prefill", b, s) for b in self.batch_buckets for s in self.seq_buckets]
        keys += [("extend", b, m) for b in self.batch_buckets for m in self.extend_buckets]
        if "retrieval" in self.heads:
            keys += [("retrieve", b) for b in self.batch_buckets]
            if self.cfg.direct_recommend:
                keys += [("recommend", b, s) for b in self.batch_buckets for s in self.seq_buckets]
        if "rank" in self.heads:
            keys += [("rank", b, m) for b in self.batch_buckets for m in self.rank_buckets]
        return keys

    def warmup(self) -> None:
        """Compile every executable (and the generative ones) and run each once."""
        t0 = time.perf_counter()
        for key in self.executables():
            if key not in self._exec:
                self._exec[key] = self._compile(*self._signature(key))
        if self.semantic.can_generate and "generative" in self.heads and self._gen is None:
            self._gen = self._compile_generate(self.semantic.trie)
        self._feature_width = None
        if self.semantic.cold_start_reason() is None:  # load the RQ-VAE now, not on the first registration
            self._feature_width = self.semantic.feature_width()
        self._dry_run()
        self.ready = True
        log.info("engine ready: %d executables compiled in %.1fs", self.compiles, time.perf_counter() - t0)

    def _signature(self, key: tuple, pool=None) -> tuple[Callable, tuple, tuple[int, ...]]:
        """(function, example arguments, donated argument indices) of an executable; the
        pool argument is ``pool`` (default: its abstract shapes, for compiling)."""
        i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        w, c = self.weights, self.capacity
        pool = self._pool_shapes if pool is None else pool
        name, b = key[0], key[1]
        windows = lambda s: {**{k: i32(b, s) for k in ("items", "actions", "timestamps", "query_timestamps")},  # noqa: E731
                             "lengths": i32(b)}  # pad_batch's arrays
        if name == "prefill":
            fn = self._fn.wrap(steps.prefill_step, last_only=self.cfg.last_token_only)
            return fn, (w, pool, windows(key[2]), i32(b)), (1,)
        if name == "extend":
            m = key[2]
            new = {k: i32(b, m) for k in ("items", "actions", "timestamps", "query_timestamps")}
            new.update(lengths=i32(b), prev_timestamp=i32(b))
            return self._fn.wrap(steps.extend_step), (w, pool, new, i32(b), i32(b, c), i32(b)), (1,)
        if name == "recommend":
            fn = self._fn.wrap(steps.recommend_step, k=self.top_k, last_only=self.cfg.last_token_only)
            return fn, (w, self.item_table, np.int32(0), windows(key[2]), i32(b, self.exclude_width)), ()
        if name == "retrieve":
            fn = self._fn.wrap(steps.retrieve_step, k=self.top_k)
            return fn, (w, self.item_table, np.int32(0), pool.user, i32(b), i32(b, self.exclude_width)), ()
        if name == "rank":
            m = key[2]
            fn = self._fn.wrap(steps.rank_step, unknown_action=self.unknown_action)
            return fn, (w, self.item_table, pool, i32(b), i32(b), i32(b, c), i32(b, m), i32(b), i32(b)), ()
        raise KeyError(key)

    def _compile_generate(self, trie) -> tuple[Any, dict]:
        trie = jax.device_put(trie, self.sharding)
        fn = self._fn.wrap(steps.generate_step, beam_width=self.beam_width, max_len=self.max_len,
                           search=self.semantic.search)
        execs = {b: self._compile(fn, self._generate_args(b, self._pool_shapes, trie)) for b in self.batch_buckets}
        return trie, execs

    def _generate_args(self, b: int, pool, trie) -> tuple:
        """Example arguments of the batch-``b`` beam-search step (zero slots, lengths, exclusions)."""
        i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        history = self.semantic.history_codes([], b, self.max_len) if self.semantic.repeat_aware else None
        return (self.weights, pool, i32(b), i32(b), i32(b, self.exclude_width), trie, history,
                self.semantic.exclusion_codes([], b, self.exclude_width))

    def _dry_run(self) -> None:
        """One tiny request through every path (first executions allocate buffers)."""
        h = History.from_arrays(np.ones(1, np.int32))
        jobs: list[Job] = []
        warm_user = "\x00warm-up"  # through the pool path too (anonymous rows skip it)
        if "retrieval" in self.heads:
            jobs += [RecommendJob(h, 1), RecommendJob(h, 1, user_id=warm_user)]
        if "rank" in self.heads:
            jobs.append(RankJob(h, np.ones(1, np.int32)))
        if self._gen is not None:
            jobs.append(RecommendJob(h, 1, mode="generative"))
        counts = (self.prefix.hits, self.prefix.misses, self.prefix.evictions)
        self.process(jobs, _warm=True)
        self.prefix.discard(warm_user)
        self.prefix.hits, self.prefix.misses, self.prefix.evictions = counts
        self._run_every_executable()

    def _run_every_executable(self) -> None:
        """Execute each compiled step once on zero inputs, so that no request pays an
        executable's first run (on a GPU: loading its kernels, first allocations); the dry
        run above reaches only the smallest buckets. Zero slots write only the pool's
        padding slot 0."""
        t0 = time.perf_counter()
        outs = []
        for key, exe in self._exec.items():
            _, args, donate = self._signature(key, pool=self._pool)
            out = exe(*args)
            if donate:  # the pool (prefill, extend) comes back updated
                self._pool = out
            else:
                outs.append(out)
        if self._gen is not None:
            trie, execs = self._gen
            outs += [exe(*self._generate_args(b, self._pool, trie)) for b, exe in execs.items()]
        jax.block_until_ready((outs, self._pool))
        log.info("ran %d executables once in %.2fs", len(self._exec) + len(self._gen[1] if self._gen else ()),
                 time.perf_counter() - t0)

    # ----------------------------------------------------------------- building jobs

    def recommend_job(self, history: Sequence[Mapping] | History, *, k: int = 10, mode: str = "retrieval",
                      context: Mapping | None = None, exclude_history: bool = False,
                      exclude_items: Sequence[Any] = (), user_id: str | None = None) -> RecommendJob:
        """Validate a recommend request (external ids) into a job. Raises RequestError /
        Conflict naming the field."""
        if mode not in MODES:
            raise RequestError("mode", f"must be one of {list(MODES)}")
        self._require_head(mode)
        if mode == "generative":
            self.semantic.require_decoder()
            top = min(self.top_k, self.beam_width)
            if not 1 <= k <= top:
                raise RequestError("k", f"must be in [1, {top}] (generative mode returns at most "
                                        f"serve.beam_width={self.beam_width} items)")
        elif not 1 <= k <= self.top_k:
            raise RequestError("k", f"must be in [1, {self.top_k}]")
        h = self._history(history, context)
        if not exclude_items and not exclude_history:
            exclude = _NO_EXCLUDE
        else:
            ex = self.catalog.internals(exclude_items, "exclude_items")
            exclude = np.unique(np.concatenate([ex, h.items if exclude_history else
                                                np.zeros(0, np.int32)]).astype(np.int32))
        if len(exclude) > self.exclude_width:
            raise RequestError("exclude_items", f"{len(exclude)} distinct items to exclude (exclude_items plus the "
                                                f"history when exclude_history); at most {self.exclude_width}")
        return RecommendJob(h, int(k), mode, exclude, user_id)

    def rank_job(self, history: Sequence[Mapping] | History, candidates: Sequence[Any], *,
                 context: Mapping | None = None, user_id: str | None = None,
                 resolved: np.ndarray | None = None) -> RankJob:
        """``resolved``: the candidates' internal ids, already looked up (``candidates`` is
        then ignored)."""
        self._require_head("rank")
        n = len(candidates) if resolved is None else len(resolved)
        if n == 0:
            raise RequestError("candidates", "must hold at least one item")
        if n > self.cfg.max_candidates:
            raise RequestError("candidates", f"{n} items; at most {self.cfg.max_candidates}")
        h = self._history(history, context)
        cand = self.catalog.internals(candidates, "candidates") if resolved is None else resolved
        return RankJob(h, cand, user_id)

    def _require_head(self, head: str) -> None:
        if head not in self.heads:
            raise Conflict(f"this server runs without the {head} head (heads: {', '.join(self.heads)})")

    def _history(self, history, context: Mapping | None) -> History:
        if isinstance(history, History):
            return history
        ts = None if not context else context.get("timestamp")
        return parse_history(history, self.catalog, max_history_len=self.cfg.max_history_len, request_ts=ts)

    # ----------------------------------------------------------------- in-process API

    def recommend(self, history: Sequence[Mapping] | History, context: Mapping | None = None, k: int = 10,
                  **kwargs) -> list[dict]:
        """Top-k ``[{"item_id", "score"}]`` for one history (events with external ids)."""
        rec = self.process([self.recommend_job(history, k=k, context=context, **kwargs)])[0]
        return [{"item_id": self.catalog.external(i), "score": float(s)} for i, s in zip(rec.items, rec.scores)]

    def rank(self, history: Sequence[Mapping] | History, candidates: Sequence[Any], context: Mapping | None = None,
             user_id: str | None = None) -> list[dict]:
        """Per-candidate ``{"item_id", "scores": {task: p, "retrieval": logit}}`` in input order."""
        res = self.process([self.rank_job(history, candidates, context=context, user_id=user_id)])[0]
        return [{"item_id": str(c), "scores": {n: float(v[i]) for n, v in res.scores.items()}}
                for i, c in enumerate(candidates)]

    def recommend_batch(self, histories: Sequence[History], k: int = 10, mode: str = "retrieval",
                        exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Internal item ids int32 [B, k] and scores [B, k] (id 0 / -inf where fewer than k)
        for histories in internal ids: the engine's output for parity checks (ONNX)."""
        jobs = [RecommendJob(h, k, mode, np.asarray(exclude[i] if exclude is not None else [], np.int32))
                for i, h in enumerate(histories)]
        out_ids = np.zeros((len(jobs), k), np.int32)
        out_scores = np.full((len(jobs), k), -np.inf, np.float32)
        for i, rec in enumerate(self.process(jobs)):
            out_ids[i, :len(rec.items)] = rec.items
            out_scores[i, :len(rec.items)] = rec.scores
        return out_ids, out_scores

    # ----------------------------------------------------------------- running

    def process(self, jobs: Sequence[Job], _warm: bool = False) -> list[Recommendation | RankScores]:
        """Run jobs (any mix of kinds), at most ``max_batch`` encoder rows per pass."""
        return self.collect(self.dispatch(jobs, _warm=_warm))

    def dispatch(self, jobs: Sequence[Job], _warm: bool = False) -> "_Pending":
        """First half of ``process``: assign cache slots and launch every step for ``jobs``
        (the device runs them in order; nothing waits here). ``collect`` gives the answers.
        Batches may be dispatched before earlier ones are collected (``serve.pipeline_depth``):
        every step reads and writes the K/V pool through one chain of donated buffers, so
        the device applies them in dispatch order."""
        if not (self.ready or _warm):
            raise NotReady("the engine is still compiling")
        pending = _Pending(time.perf_counter())
        with self._lock:
            for i in range(0, len(jobs), self.max_batch):
                pending.chunks.append(self._dispatch(jobs[i:i + self.max_batch]))
        return pending

    def collect(self, pending: "_Pending") -> list[Recommendation | RankScores]:
        """Second half of ``process``: wait for a dispatched batch's outputs and build its
        answers (in the jobs' order). Needs no lock: it reads only that batch's outputs."""
        out: list = []
        for chunk in pending.chunks:
            try:
                out.extend(self._collect(chunk))
            except BaseException:
                with self._lock:
                    self._recover(chunk.rows)
                raise
        if self.host_spans is not None:
            self._span("total", pending.t0)
            self.host_spans["batches"] = self.host_spans.get("batches", 0) + 1
        return out

    def _span(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        if self.host_spans is not None:
            self.host_spans[name] = self.host_spans.get(name, 0.0) + t - t0
        return t

    def _dispatch(self, jobs: Sequence[Job]) -> "_Chunk":
        rows = self._assign_slots(jobs)
        direct, rows = self._split_direct(jobs, rows)
        try:
            pending = self._direct(jobs, direct)
            self._encode(rows)
            self._heads(jobs, rows, pending)
            ranked = self._rank(jobs, [r for r in rows if isinstance(jobs[r.job], RankJob)])
        except BaseException:
            self._recover(rows)
            raise
        # Committed now, not after the answers: a later batch dispatched meanwhile finds the
        # user's prefix, and its steps run after this one's writes on the device. A failure
        # while collecting forgets these users again (``collect``).
        for r in rows:
            if r.user_id is not None:
                self.prefix.commit(r.user_id, r.slot, r.window)
        return _Chunk(jobs, rows, pending, ranked)

    def _collect(self, chunk: "_Chunk") -> list:
        results: list = [None] * len(chunk.jobs)
        self._fetch_top(chunk.jobs, chunk.pending, results)
        self._fetch_rank(chunk.ranked, results)
        return results

    def _split_direct(self, jobs: Sequence[Job], rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
        """(anonymous retrieval rows, the rest): the first go through ``recommend`` alone."""
        if not (self.cfg.direct_recommend and "retrieval" in self.heads):
            return [], rows
        direct, rest = [], []
        for r in rows:
            job = jobs[r.job]
            anon = job.user_id is None and isinstance(job, RecommendJob) and job.mode == "retrieval"
            (direct if anon else rest).append(r)
        return direct, rest

    def _direct(self, jobs: Sequence[Job], rows: list[_Row]) -> list:
        """Dispatch encode + top-k for anonymous retrieval rows; outputs fetched in _heads."""
        pending = []
        groups: dict[int, list[_Row]] = {}
        for r in rows:
            groups.setdefault(pick_bucket(len(r.window), self.seq_buckets), []).append(r)
        for s, group in sorted(groups.items()):
            for lo, hi, b in chunks(len(group), self.batch_buckets):
                part = group[lo:hi]
                batch = pad_batch([r.window for r in part], b, s, self.max_len)
                self._observe("recommend", len(part), b)
                out = self._call(("recommend", b, s), self.weights, self.item_table, np.int32(self.live_items),
                                 batch, self._exclude(jobs, part, b))
                pending.append(("retrieval", part, _to_host_async(out)))
        return pending

    def _exclude(self, jobs: Sequence[Job], part: list[_Row], b: int) -> np.ndarray | jax.Array:
        if all(len(jobs[r.job].exclude) == 0 for r in part):  # the usual case: nothing to send
            if b not in self._no_exclude:
                self._no_exclude[b] = jax.device_put(np.zeros((b, self.exclude_width), np.int32), self.sharding)
            return self._no_exclude[b]
        exclude = np.zeros((b, self.exclude_width), np.int32)
        for i, r in enumerate(part):
            ex = jobs[r.job].exclude
            exclude[i, :len(ex)] = ex
        return exclude

    def _exclusion_codes(self, jobs: Sequence[Job], part: list[_Row], b: int) -> tuple:
        """The generative step's ``excluded`` arrays; the all-empty ones stay on the device."""
        if all(len(jobs[r.job].exclude) == 0 for r in part):
            if b not in self._no_exclusion_codes:
                empty = self.semantic.exclusion_codes([], b, self.exclude_width)
                self._no_exclusion_codes[b] = jax.device_put(empty, self.sharding)
            return self._no_exclusion_codes[b]
        return self.semantic.exclusion_codes([jobs[r.job].exclude for r in part], b, self.exclude_width)

    def _assign_slots(self, jobs: Sequence[Job]) -> list[_Row]:
        rows, seen = [], set()
        scratch = 1
        for j, job in enumerate(jobs):
            w = job.history.window(self.max_len)
            uid = job.user_id
            if uid is not None and self.prefix.enabled and uid not in seen:
                seen.add(uid)
                lk = self.prefix.lookup(uid, w, self.extend_buckets[-1])
                rows.append(_Row(j, w, lk.slot, lk.start, uid))
            else:  # anonymous, or the same user twice in one batch: no cache for this one
                if uid is not None and self.prefix.enabled:
                    self.prefix.misses += 1
                rows.append(_Row(j, w, scratch, 0, None))
                scratch += 1
        return rows

    def _recover(self, rows: list[_Row]) -> None:
        """After a failed pass: forget the users whose slots were being written, and
        rebuild the pool if the failure happened after it was donated."""
        for r in rows:
            if r.user_id is not None:
                self.prefix.discard(r.user_id)
        if any(x.is_deleted() for x in jax.tree.leaves(self._pool)):
            log.warning("rebuilding the K/V slot pool after a failed step; the prefix cache is cleared")
            self.prefix.clear()
            self._pool = self._new_pool()

    def _call(self, key: tuple, *args):
        """Run a compiled step. Host inputs go in as numpy: the executable's C++ path moves
        them to the device far cheaper than ``jax.device_put`` per array."""
        exe = self._exec.get(key)
        if exe is None:  # never compile on the request path
            raise RuntimeError(f"no compiled executable for {key}; buckets: batch {self.batch_buckets}")
        t0 = time.perf_counter()
        out = exe(*args)
        self._span("dispatch", t0)
        return out

    def _encode(self, rows: list[_Row]) -> None:
        cold: dict[int, list[_Row]] = {}
        warm: dict[int, list[_Row]] = {}
        for r in rows:
            if r.start == 0:
                cold.setdefault(pick_bucket(len(r.window), self.seq_buckets), []).append(r)
            else:
                warm.setdefault(pick_bucket(len(r.window) - r.start, self.extend_buckets), []).append(r)
        for s, group in sorted(cold.items()):
            for lo, hi, b in chunks(len(group), self.batch_buckets):
                part = group[lo:hi]
                batch = pad_batch([r.window for r in part], b, s, self.max_len)
                slots = _pad_slots([r.slot for r in part], b)
                self._observe("prefill", len(part), b)
                self._pool = self._call(("prefill", b, s), self.weights, self._pool, batch, slots)
        for m, group in sorted(warm.items()):
            for lo, hi, b in chunks(len(group), self.batch_buckets):
                part = group[lo:hi]
                new, start, k_ts = extend_inputs(part, b, m, self.capacity)
                slots = _pad_slots([r.slot for r in part], b)
                self._observe("extend", len(part), b)
                self._pool = self._call(("extend", b, m), self.weights, self._pool, new, start,
                                        k_ts, slots)

    def _heads(self, jobs: Sequence[Job], rows: list[_Row], pending: list) -> None:
        # pending: (kind, rows, device outputs), fetched after every step is dispatched
        by_kind: dict[str, list[_Row]] = {"retrieval": [], "generative": [], "rank": []}
        for r in rows:
            job = jobs[r.job]
            by_kind["rank" if isinstance(job, RankJob) else job.mode].append(r)
        for kind in ("retrieval", "generative"):
            group = by_kind[kind]
            if not group:
                continue
            if kind == "generative":
                self.semantic.require_decoder()
                trie, gen_execs = self._gen
            for lo, hi, b in chunks(len(group), self.batch_buckets):
                part = group[lo:hi]
                slots = _pad_slots([r.slot for r in part], b)
                exclude = self._exclude(jobs, part, b)
                self._observe(kind, len(part), b)
                if kind == "retrieval":
                    out = self._call(("retrieve", b), self.weights, self.item_table, np.int32(self.live_items),
                                     self._pool.user, slots, exclude)
                else:
                    lengths = _pad_slots([len(r.window) for r in part], b)
                    history = (self.semantic.history_codes([r.window for r in part], b, self.max_len)
                               if self.semantic.repeat_aware else None)
                    excluded = self._exclusion_codes(jobs, part, b)
                    out = gen_execs[b](self.weights, self._pool, slots, lengths, exclude, trie, history, excluded)
                pending.append((kind, part, _to_host_async(out)))

    def _fetch_top(self, jobs: Sequence[Job], pending: list, results: list) -> None:
        for kind, part, (ids, scores) in pending:
            t0 = time.perf_counter()
            if self.host_spans is not None:
                jax.block_until_ready((ids, scores))
                t0 = self._span("wait", t0)
            ids, scores = np.asarray(ids), np.asarray(scores, np.float32)
            t0 = self._span("fetch", t0)
            finite = np.isfinite(scores)
            for i, r in enumerate(part):
                k = jobs[r.job].k
                if finite[i, :k].all():  # the usual case: no copy through a mask
                    results[r.job] = Recommendation(ids[i, :k], scores[i, :k])
                else:
                    keep = finite[i, :k]
                    results[r.job] = Recommendation(ids[i, :k][keep], scores[i, :k][keep])
            self._span("results", t0)

    def _rank(self, jobs: Sequence[Job], group: list[_Row]) -> list:
        """Dispatch the M-FALCON steps for the rank rows; ``_fetch_rank`` collects them."""
        if not group:
            return []
        top = self.rank_buckets[-1]
        pieces = []  # (row, candidate offset, count)
        for r in group:
            n = len(jobs[r.job].candidates)
            pieces += [(r, o, min(top, n - o)) for o in range(0, n, top)]
        m = pick_bucket(max(p[2] for p in pieces), self.rank_buckets)
        outs = []
        for lo, hi, b in chunks(len(pieces), self.batch_buckets):
            part = pieces[lo:hi]
            slots = _pad_slots([p[0].slot for p in part], b)
            hist = _pad_slots([len(p[0].window) for p in part], b)
            k_ts = np.zeros((b, self.capacity), np.int32)
            cand = np.zeros((b, m), np.int32)
            count = np.zeros(b, np.int32)
            req = np.zeros(b, np.int32)
            for i, (r, o, c) in enumerate(part):
                w = r.window
                origin = int(w.timestamps[0])
                k_ts[i, :len(w)] = w.timestamps - origin
                cand[i, :c] = jobs[r.job].candidates[o:o + c]
                count[i] = c
                req[i] = w.request_ts - origin
            self._observe("rank", len(part), b)
            outs.append((part, _to_host_async(self._call(("rank", b, m), self.weights, self.item_table, self._pool,
                                                         slots, hist, k_ts, cand, count, req))))
        return outs

    def _fetch_rank(self, outs: list, results: list) -> None:
        collected: dict[int, dict[str, list]] = {}
        for part, (probs, retrieval) in outs:
            probs = None if probs is None else np.asarray(probs)
            retrieval = np.asarray(retrieval)
            for i, (r, o, c) in enumerate(part):
                d = collected.setdefault(r.job, {})
                for t, name in enumerate(self.task_names):
                    d.setdefault(name, []).append(probs[i, :c, t])
                d.setdefault("retrieval", []).append(retrieval[i, :c])
        for j, d in collected.items():
            results[j] = RankScores({name: np.concatenate(v).astype(np.float32) for name, v in d.items()})

    def _observe(self, step: str, rows: int, bucket: int) -> None:
        if self.on_call is not None:
            self.on_call(step, rows, bucket)

    # ----------------------------------------------------------------- cold start

    def add_items(self, items: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Register cold-start items ``[{"item_id", "features": [float, ...]}]``.

        Each is placed as ``semantic_ids.cold_start.add_items`` places it with the served
        model (its parameters as served, its live item rows): a semantic ID on the code
        path its content neighbours' pseudo-user gets from the decoder (without a decoder:
        from the items nearest their mean embedding, with training popularity), and a
        retrieval embedding averaged from the first items of that ranking. It is
        recommendable, rankable and usable in histories at once, without retraining. The
        item table was padded for them at start, so nothing recompiles except the
        generative step when the trie grows -- compiled here, in the caller's thread (as
        is the placement's beam search), and swapped in atomically while requests keep
        being served. Raises Conflict without an RQ-VAE, or when
        ``serve.cold_start_capacity`` is used up.
        """
        with self._register_lock:
            reason = self.semantic.cold_start_reason()
            if reason:
                raise Conflict(reason)
            ids = [str(it["item_id"]) for it in items]
            for i, x in enumerate(ids):
                if x in self.catalog or x in ids[:i]:
                    raise RequestError(f"items[{i}].item_id", f"item {x!r} is already in the catalogue"
                                       if x in self.catalog else f"item {x!r} appears twice")
            if self.live_items + len(ids) > self.item_capacity:
                raise Conflict(f"room for {self.item_capacity - self.live_items} more cold-start items "
                               f"(serve.cold_start_capacity={self.cfg.cold_start_capacity}); restart with a "
                               "larger capacity or retrain")
            # The weights change only here, under the registration lock: read them without
            # holding up requests.
            model, emb = self._served_model()
            reg = self.semantic.register([it["features"] for it in items], self.live_items, emb, model)
            del model
            gen = self._compile_generate(reg.trie) if self._gen is not None else None
            start = self.live_items + 1
            rows = np.arange(start, start + len(ids))
            new = jnp.asarray(reg.embeddings)
            with self._lock:
                params, rest = jax.tree.unflatten(self._fn.treedef, self.weights)
                params = map_item_embedding(params, lambda e: e.at[rows].set(new.astype(e.dtype)))
                vecs = l2_normalize(new) if self._l2_norm else new
                self.item_table = self.item_table.at[rows].set(vecs.astype(self.item_table.dtype))
                self.weights = jax.tree.leaves((params, rest))
                internal = self.catalog.add(ids)
                assert internal == rows.tolist(), (internal, rows)
                self.live_items += len(ids)
                if gen is not None:
                    self._gen = gen
                self.semantic.commit(reg)
        return [{"item_id": x, "semantic_id": [int(c) for c in code]} for x, code in zip(ids, reg.codes)]

    def _served_model(self):
        """What cold-start placement reads: the live item embeddings float32
        [live_items + 1, D], and, when the model has a decoder (else None), a throwaway
        view of the model as served -- float32 parameters (the stored ones, cast as every
        step casts them) with the live item rows, the live code table and item count, i.e.
        the model ``cold_start.add_items`` would have grown by the same registrations."""
        params, rest = jax.tree.unflatten(self._fn.treedef, self.weights)
        n = self.live_items + 1
        emb = np.asarray(params["item_emb"]["embedding"][...][:n], np.float32)
        if not self.semantic.has_decoder:
            return None, emb
        params = map_item_embedding(params, lambda e: e[:n])
        params = jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                              params)
        view = nnx.merge(self._fn.graphdef, params, rest)
        view.num_items = self.live_items
        if getattr(view, "item_codes", None) is not None:
            view.item_codes.set_value(jnp.asarray(self.semantic.item_codes(), jnp.int32))
        return view, emb

    # ----------------------------------------------------------------- introspection

    def stats(self) -> dict:
        return {
            "ready": self.ready,
            "compiles": self.compiles,
            "compile_seconds": self.compile_seconds,
            "prefix_cache_hits": self.prefix.hits,
            "prefix_cache_misses": self.prefix.misses,
            "prefix_cache_evictions": self.prefix.evictions,
            "prefix_cache_entries": len(self.prefix),
            "prefix_cache_capacity": self.prefix.capacity,
            "prefix_cache_hit_rate": self.prefix.hit_rate(),
            "pool_bytes": self.pool_bytes,
        }

    def describe(self) -> dict:
        return {
            "model_version": self.model_version,
            "num_items": len(self.catalog),
            "max_len": self.max_len,
            "batch_buckets": self.batch_buckets,
            "seq_buckets": self.seq_buckets,
            "extend_buckets": self.extend_buckets,
            "rank_buckets": self.rank_buckets,
            "tasks": list(self.task_names),
            "heads": list(self.heads),
            "generative": self.semantic.can_generate and "generative" in self.heads,
            "cold_start": self.semantic.cold_start_reason() is None,
            "cold_start_capacity": self.item_capacity - self.live_items,
            "cold_start_features": getattr(self, "_feature_width", None),
            "param_dtype": self.cfg.param_dtype,
        }


# --------------------------------------------------------------------------- helpers


def map_item_embedding(params, fn: Callable[[jax.Array], jax.Array]):
    """``params`` (an nnx State) with the item embedding table replaced by ``fn(table)``."""
    def one(path, x):
        return fn(x) if jax.tree_util.keystr(path).startswith("['item_emb']['embedding']") else x

    return jax.tree_util.tree_map_with_path(one, params)


def _to_host_async(out):
    """Start copying a step's outputs to the host as soon as the device has them (queued
    behind the step), so that collecting them does not begin the copies only then."""
    for x in jax.tree.leaves(out):
        x.copy_to_host_async()
    return out


def _pad_slots(values: Sequence[int], b: int) -> np.ndarray:
    out = np.zeros(b, np.int32)
    out[:len(values)] = values
    return out


def extend_inputs(rows: Sequence[_Row], b: int, m: int, capacity: int):
    """Inputs of the ``extend`` step: the tokens ``window[start:]`` of each row, the
    previous token's time, and the times of the cached tokens (all relative to the
    window's first event, as in ``pad_batch``)."""
    new = {k: np.zeros((b, m), np.int32) for k in ("items", "actions", "timestamps", "query_timestamps")}
    new["lengths"] = np.zeros(b, np.int32)
    new["prev_timestamp"] = np.zeros(b, np.int32)
    start = np.zeros(b, np.int32)
    k_ts = np.zeros((b, capacity), np.int32)
    for i, r in enumerate(rows):
        w, s = r.window, r.start
        rel = (w.timestamps - w.timestamps[0]).astype(np.int32)
        n = len(w) - s
        new["items"][i, :n] = w.items[s:]
        new["actions"][i, :n] = w.actions[s:]
        new["timestamps"][i, :n] = rel[s:]
        new["query_timestamps"][i, :n - 1] = rel[s + 1:]
        new["query_timestamps"][i, n - 1] = w.request_ts - int(w.timestamps[0])
        new["lengths"][i] = n
        new["prev_timestamp"][i] = rel[s - 1]
        start[i] = s
        k_ts[i, :s] = rel[:s]
    return new, start, k_ts


def _apply_serve_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    if not overrides:
        return cfg
    from genrec_jax.config import _build, _nest, _parse_override, validate

    for item in overrides:
        keys, value = _parse_override(item)
        if keys[0] != "serve":
            raise ValueError(f"--set {item}: only serve.* settings can change at serving time")
        cfg = _build(Config, _nest(keys, value), "", f"--set {item}", base=cfg)
    return validate(cfg, "serve overrides")

#!/usr/bin/env python
"""Check every Triton kernel on a CUDA GPU against float64 references.

    python bench/gpu_check.py [--json rows.json] [--only attention,configs,jagged,torch,cached,interaction,reference,sharded,moe]

For each kernel (HSTU attention forward, backward — dQ, dK, dV, d pos_bias, d time_bias —,
jagged, M-FALCON targets, cached/decode; interaction forward and backward; the MoE grouped
matmul forward, input and weight gradients, and a whole MoE layer against its XLA form) and several
shapes (ragged lengths including 1, odd sizes, the maximum length), on fresh random inputs:

* through jax-triton (the production path, autotuned), fp32 and bf16;
* every autotune configuration pinned one at a time (autotuning may pick any of them);
* through the native Triton launcher on torch CUDA tensors with NaN-poisoned outputs
  (``launch_mode="torch"``): an element a kernel never writes fails the check.

Error metric: ||out - ref|| / ||ref|| against float64 (``jax.grad`` of the float64 reference
math for gradients); fp32 must be under 1e-5, bf16 under 1e-2 (inputs are bf16-rounded
before the reference sees them); NaN or Inf never passes; padding rows must be exactly 0.
Prints a PASS/FAIL table; ``--json`` writes one object per row; exits 1 on any failure,
2 when there is no CUDA GPU / jax-triton.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_rows  # noqa: E402

ALL_GROUPS = ("attention", "configs", "jagged", "torch", "cached", "interaction", "reference", "sharded", "moe")

# --interpret (development only): the same checks through the CPU interpreter, shapes capped.
MODE = {"main": "jax_triton", "small": False}


def cap(x: int, limit: int) -> int:
    return min(x, limit) if MODE["small"] else x


def seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def gpu_ready() -> tuple[bool, str]:
    try:
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            return False, f"no CUDA GPU visible to jax (devices: {jax.devices()})"
    except Exception as e:  # noqa: BLE001
        return False, f"jax failed to start: {e}"
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"jax-triton / triton not importable: {e}"
    return True, ""


def err_of(got, want) -> float:
    import jax.numpy as jnp

    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    if not np.all(np.isfinite(got)):
        return math.inf
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


class Runner:
    def __init__(self):
        self.rows: list[dict] = []

    def run(self, group: str, name: str, case: str, dtype: str, mode: str, fn):
        """``fn()`` returns [(what, error, tolerance), ...]; an exception is one FAIL row."""
        t0 = time.time()
        try:
            results = fn()
        except Exception as e:  # noqa: BLE001
            results = [("exception", math.inf, 0.0)]
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
        else:
            note = ""
        secs = time.time() - t0
        for what, err, tol in results:
            ok = bool(np.isfinite(err) and err <= tol)
            row = dict(group=group, kernel=name, case=case, dtype=dtype, mode=mode, check=what, error=err, tol=tol,
                       status="PASS" if ok else "FAIL", seconds=round(secs, 2), note=note)
            self.rows.append(row)
            print(f"{row['status']:4s}  {name:22s} {case:44s} {dtype:9s} {mode:10s} {what:12s} "
                  f"err={err:.2e} tol={tol:.0e}  {note}", flush=True)


# --------------------------------------------------------------------------- attention


def attention_checks(A, dtype, mode, p, n, *, norm, alpha, grads=True, **extra):
    import jax
    import jax.numpy as jnp

    tol = A.tolerance(dtype)
    f = A.kernel_fn(norm=norm, alpha=alpha, max_len=n, mode=mode, **extra)
    args = A.problem_args(p, dtype)
    out = jax.jit(f)(*args)
    cast = {k: np.asarray(jnp.asarray(p[k]).astype(dtype).astype(jnp.float32)) for k in "qkv"}
    terms = A.problem_terms(p, n)
    rows = []
    cot = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    cot_seen = np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32))
    if grads:
        want_out, want_g = A.oracle(cast["q"], cast["k"], cast["v"], terms, p["pos_bias"], p["time_bias"], alpha=alpha,
                                    norm=norm, max_len=n, cotangent=cot_seen)
    else:
        want_out = A.oracle(cast["q"], cast["k"], cast["v"], terms, p["pos_bias"], p["time_bias"], alpha=alpha,
                            norm=norm, max_len=n)
    rows.append(("out", err_of(out, want_out), tol))
    o = np.asarray(out.astype(jnp.float32))
    pad = max([float(np.abs(o[r, L:]).max()) if L < n else 0.0 for r, L in enumerate(p["lengths"])])
    rows.append(("pad_rows==0", pad if np.isfinite(pad) else math.inf, 0.0))
    if grads:
        names = [k for k in ("q", "k", "v", "pos_bias", "time_bias") if p[k] is not None]
        idx = [A.ARRAY_KEYS.index(k) for k in names]

        def loss(*xs):
            a = list(args)
            for i, x in zip(idx, xs):
                a[i] = x
            return jnp.sum(f(*a).astype(jnp.float32) * cot)

        g = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*[args[i] for i in idx])
        want = dict(zip(("q", "k", "v", "pos_bias", "time_bias"), want_g))
        for k, gk in zip(names, g):
            rows.append((f"d{k}", err_of(gk, want[k]), tol))
    return rows


ATTN_CASES = [
    # name, dtype, norm, b, n, h, dqk, dv, lengths, targets, pos, time
    ("B4 N256 H2 D128 full-rab targets", "bfloat16", "causal_count", 4, 256, 2, 128, 128, [256, 1, 131, 200],
     True, True, True),
    ("B2 N333 H4 D64 no-rab", "float32", "max_len", 2, 333, 4, 64, 64, [333, 1], False, False, False),
    ("B3 N77 H1 Dqk48 Dv80 full-rab targets", "float32", "causal_count", 3, 77, 1, 48, 80, [77, 1, 40], True, True,
     True),
    ("B2 N1024 H2 D128 pos-only", "bfloat16", "max_len", 2, 1024, 2, 128, 128, [1024, 513], False, True, False),
    ("B3 N300 H2 D128 time-only", "bfloat16", "causal_count", 3, 300, 2, 128, 128, [300, 1, 299], False, False,
     True),
    # from GROUP_MIN_LEN = 2048 events the kernels launch block-fastest; without a bias the
    # forward's first configuration issues the next key block's scores early (EARLY_S)
    ("B2 N2048 H2 D128 no-rab grouped", "bfloat16", "max_len", 2, 2048, 2, 128, 128, [2048, 1500], False, False,
     False),
    ("B2 N2100 H2 D64 full-rab targets grouped", "bfloat16", "causal_count", 2, 2100, 2, 64, 64, [2100, 1337], True,
     True, True),
]


def run_attention(R, A, modes=None, cases=ATTN_CASES):
    modes = modes or (MODE["main"],)
    for name, dtype, norm, b, n, h, dqk, dv, lengths, targets, pos, tim in cases:
        n, dqk, dv = cap(n, 40), cap(dqk, 32), cap(dv, 32)
        lengths = [min(L, n) for L in lengths]
        rng = np.random.default_rng(seed(name))
        p = A.make_problem(rng, b, n, h, dqk, dv, lengths=lengths, targets=targets, pos=pos, time=tim)
        for mode in modes:
            R.run("attention", "hstu_attention", name, dtype, mode,
                  lambda: attention_checks(A, dtype, mode, p, n, norm=norm, alpha=1 / math.sqrt(dqk)))
            R.run("attention", "hstu_attention dq=sep", name, dtype, mode,
                  lambda: attention_checks(A, dtype, mode, p, n, norm=norm, alpha=1 / math.sqrt(dqk),
                                           dq_mode="separate")[2:])
            R.run("attention", "hstu_attention dq=stored", name, dtype, mode,
                  lambda: attention_checks(A, dtype, mode, p, n, norm=norm, alpha=1 / math.sqrt(dqk),
                                           dq_mode="stored")[2:])


def run_config_sweep(R, A):
    """Each autotune configuration pinned: all must be correct (any may win autotuning)."""
    from genrec_jax.kernels import hstu_attention as ka
    from genrec_jax.kernels import launch

    mode = MODE["main"]
    for rab in (True, False):
        rng = np.random.default_rng(7 + rab)
        n, d = cap(200, 70), cap(128, 16)
        p = A.make_problem(rng, 3, n, 2, d, d, lengths=[n, 1, 97 % n], targets=rab, pos=rab, time=rab)
        for cfg in launch.autotune_configs(ka.autotuned("fwd", 128, rab)):
            R.run("configs", "hstu_fwd", f"N{n} rab={rab} {cfg}", "bfloat16", mode,
                  lambda: attention_checks(A, "bfloat16", mode, p, n, norm="causal_count", alpha=0.1,
                                           grads=False, fwd_config=cfg))
        for cfg in launch.autotune_configs(ka.autotuned("bwd", 128, rab)):
            R.run("configs", "hstu_bwd", f"N{n} rab={rab} {cfg}", "bfloat16", mode,
                  lambda: attention_checks(A, "bfloat16", mode, p, n, norm="causal_count", alpha=0.1,
                                           bwd_config=cfg)[2:])
        for cfg in launch.autotune_configs(ka.autotuned("dq", 128, rab)):
            R.run("configs", "hstu_bwd_dq", f"N{n} rab={rab} {cfg}", "bfloat16", mode,
                  lambda: attention_checks(A, "bfloat16", mode, p, n, norm="causal_count", alpha=0.1,
                                           dq_mode="separate", dq_config=cfg)[2:3])
        bwds = launch.autotune_configs(ka.autotuned("bwds", 128, rab))
        for cfg in bwds:
            R.run("configs", "hstu_bwd stored", f"N{n} rab={rab} {cfg}", "bfloat16", mode,
                  lambda: attention_checks(A, "bfloat16", mode, p, n, norm="causal_count", alpha=0.1,
                                           dq_mode="stored", bwd_config=cfg)[2:])
        for cfg in launch.autotune_configs(ka.autotuned("dqs", 128, rab, bwds[0]["BLOCK_N"])):
            R.run("configs", "hstu_bwd_dq stored", f"N{n} rab={rab} {cfg}", "bfloat16", mode,
                  lambda: attention_checks(A, "bfloat16", mode, p, n, norm="causal_count", alpha=0.1,
                                           dq_mode="stored", bwd_config=bwds[0], dq_config=cfg)[2:3])


def run_jagged(R, A):
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels.hstu_attention import hstu_attention_jagged_triton

    for dtype in ("bfloat16", "float32"):
        rng = np.random.default_rng(11)
        n, d = cap(512, 40), cap(128, 16)
        lengths = [min(300, n - 3), 1, min(77, n - 1), n]
        p = A.make_problem(rng, 4, n, 2, d, d, lengths=lengths, targets=True)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

        def pack(x):
            return np.concatenate([x[r, :L] for r, L in enumerate(lengths)])

        def checks():
            def f(q, k, v, pb, tb):
                return hstu_attention_jagged_triton(
                    q, k, v, jnp.asarray(offsets), max_seq_len=n, alpha=0.1, max_len=n, norm="causal_count",
                    num_targets=jnp.asarray(p["num_targets"]), pos_bias=pb, time_bias=tb,
                    timestamps=jnp.asarray(pack(p["timestamps"])),
                    query_timestamps=jnp.asarray(pack(p["query_timestamps"])), launch_mode=MODE["main"])

            xs = [jnp.asarray(pack(p[k])).astype(dtype) for k in "qkv"] + [jnp.asarray(p["pos_bias"]),
                                                                         jnp.asarray(p["time_bias"])]
            out = jax.jit(f)(*xs)
            cot = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
            g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot), argnums=(0, 1, 2, 3, 4)))(*xs)
            cast = {k: np.asarray(jnp.asarray(p[k]).astype(dtype).astype(jnp.float32)) for k in "qkv"}
            cot_pad = np.zeros((4, n) + out.shape[1:], np.float32)
            start = 0
            for r, L in enumerate(lengths):
                cot_pad[r, :L] = cot[start:start + L]
                start += L
            cot_seen = np.asarray(jnp.asarray(cot_pad).astype(dtype).astype(jnp.float32))
            want_out, want_g = A.oracle(cast["q"], cast["k"], cast["v"], A.problem_terms(p, n), p["pos_bias"],
                                        p["time_bias"], alpha=0.1, norm="causal_count", max_len=n,
                                        cotangent=cot_seen)
            tol = A.tolerance(dtype)
            rows = [("out", err_of(out, pack(want_out)), tol)]
            for what, gk, wk in zip(("dq", "dk", "dv"), g[:3], want_g[:3]):
                rows.append((what, err_of(gk, pack(wk)), tol))
            rows.append(("dpos_bias", err_of(g[3], want_g[3]), tol))
            rows.append(("dtime_bias", err_of(g[4], want_g[4]), tol))
            return rows

        R.run("jagged", "hstu_attention_jagged", f"T={sum(lengths)} B4 maxlen{n} targets full-rab", dtype, MODE["main"],
              checks)


def run_cached(R, A, modes=None):
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels.hstu_attention import hstu_attention_cached_triton

    cases = [
        # name, dtype, norm, b, m, c, h, d, hist (None = decode/prefill), pos, time
        ("M-FALCON B4 M64 C1024", "bfloat16", "causal_count", 4, 64, 1024, 2, 128, [900, 1, 500, 37], True, True),
        ("decode B8 M1 C777", "float32", "max_len", 8, 1, 777, 2, 64, None, True, True),
        ("prefill B3 M20 C300", "bfloat16", "causal_count", 3, 20, 300, 4, 128, None, False, True),
        ("M-FALCON B2 M5 C64 fp32", "float32", "max_len", 2, 5, 64, 1, 48, [58, 1], True, False),
    ]
    modes = modes or (MODE["main"],)
    for name, dtype, norm, b, m, c, h, d, hist, pos, tim in cases:
        c, d, m = cap(c, 48), cap(d, 32), cap(m, 5)
        if hist is not None:
            hist = [min(x, c - m) for x in hist]
        rng = np.random.default_rng(seed(name))
        if hist is not None:
            hist_a = np.asarray(hist, np.int32)
            kv = hist_a + m
            qp = hist_a[:, None] + np.arange(m)[None, :]
        else:
            kv = rng.integers(m, c + 1, b).astype(np.int32)
            kv[0] = c
            qp = np.sort(rng.integers(0, kv[:, None], (b, m)), axis=1).astype(np.int32)
            qp[:, -1] = kv - 1
        q = rng.standard_normal((b, m, h, d)).astype(np.float32)
        kc = rng.standard_normal((b, c, h, d)).astype(np.float32)
        vc = rng.standard_normal((b, c, h, d)).astype(np.float32)
        kts = np.cumsum(rng.integers(0, 5000, (b, c)), axis=1).astype(np.int32)
        qts = (np.take_along_axis(kts, qp, axis=1) + rng.integers(0, 100, (b, m))).astype(np.int32)
        pb = (rng.standard_normal(c + 1) * 0.5).astype(np.float32) if pos else None
        tb = (rng.standard_normal(32) * 0.5).astype(np.float32) if tim else None
        for mode in modes:
            def checks(mode=mode):
                args = [jnp.asarray(x).astype(dtype) for x in (q, kc, vc)] + [jnp.asarray(qp), jnp.asarray(kv)]
                kw = dict(alpha=1 / math.sqrt(d), max_len=c, norm=norm,
                          hist_lengths=None if hist is None else jnp.asarray(hist, jnp.int32),
                          pos_bias=None if pb is None else jnp.asarray(pb),
                          time_bias=None if tb is None else jnp.asarray(tb),
                          k_timestamps=jnp.asarray(kts) if tim else None,
                          q_timestamps=jnp.asarray(qts) if tim else None,
                          launch_mode=mode)
                out = jax.jit(lambda *a: hstu_attention_cached_triton(*a, **kw))(*args)
                cast = [np.asarray(x.astype(jnp.float32)) for x in args[:3]]
                terms = A.cached_attention_terms(qp, kv, c, None if hist is None else np.asarray(hist),
                                                 kts if tim else None, qts, 1 if pb is None else len(pb),
                                                 1 if tb is None else len(tb))
                want = A.oracle(*cast, terms, pb, tb, alpha=1 / math.sqrt(d), norm=norm, max_len=c)
                return [("out", err_of(out, want), A.tolerance(dtype))]

            R.run("cached", "hstu_attention_cached", name, dtype, mode, checks)


def run_reference_grad(R, A):
    """jax.grad through hstu_attention(backend="triton") vs jax.grad of the XLA reference."""
    import jax
    import jax.numpy as jnp

    from genrec_jax.ops.hstu_attention import hstu_attention

    rng = np.random.default_rng(5)
    n = 256
    p = A.make_problem(rng, 3, n, 2, 64, 64, lengths=[256, 1, 100], targets=True, time=False)

    def checks():
        def loss(backend):
            def f(q, k, v, pb):
                out = hstu_attention(q, k, v, jnp.asarray(p["lengths"]), max_len=n, norm="causal_count",
                                     num_targets=jnp.asarray(p["num_targets"]), pos_bias=pb, backend=backend)
                return jnp.sum(out * cot)
            return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

        cot = jnp.asarray(np.random.default_rng(6).standard_normal((3, n, 2, 64)).astype(np.float32))
        xs = [jnp.asarray(p[k]) for k in ("q", "k", "v", "pos_bias")]
        with jax.default_matmul_precision("highest"):
            want = loss("xla")(*xs)
        got = loss("triton")(*xs)
        return [(f"d{k}", err_of(g, np.asarray(w, np.float64)), 1e-5)
                for k, g, w in zip(("q", "k", "v", "pos_bias"), got, want)]

    R.run("reference", "hstu_attention", "grad vs jax.grad(xla ref) N256", "float32", "jax_triton", checks)


# --------------------------------------------------------------------------- interaction

INTER_CASES = [(64, 16, 128, 0), (64, 50, 128, 13), (32, 128, 128, 0), (5, 7, 33, 3), (7, 2, 16, 1), (1000, 16, 128, 0)]


def run_interaction(R, I, modes=None):
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels import interaction as ki
    from genrec_jax.kernels import launch
    from genrec_jax.kernels.interaction import interaction_triton

    modes = modes or (MODE["main"],)
    cases = [(case, dtype, None) for case in INTER_CASES for dtype in ("float32", "bfloat16")]
    if MODE["main"] != "interpret":  # every autotune configuration pinned (odd batch: partial last block)
        cases += [((333, f, 128, 13), "bfloat16", cfg) for f in (16, 50)
                  for cfg in launch.autotune_configs(ki.autotuned("fwd", ki._block_f(f)))]
    for (b, f, d, dd), dtype, cfg in cases:
        b, f, d = cap(b, 8), cap(f, 20), cap(d, 40)
        for mode in modes:
            def checks(b=b, f=f, d=d, dd=dd, dtype=dtype, mode=mode, cfg=cfg):
                rng = np.random.default_rng(b + f + d + dd)
                x, dense = I._inputs(rng, b, f, d, dd, getattr(jnp, dtype))
                xj = jnp.asarray(x).astype(dtype)
                dj = None if dense is None else jnp.asarray(dense).astype(dtype)
                tol = 1e-5 if dtype == "float32" else 1e-2
                out = jax.jit(lambda a, c: interaction_triton(a, c, launch_mode=mode, config=cfg))(xj, dj)
                rows = [("out", err_of(out, I.loop64(x, dense)), tol)]
                cot = rng.standard_normal(out.shape).astype(np.float32)
                cot_seen = np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32))
                want_dx, want_dd = I.grads64(x, dense, cot_seen)  # jax.grad of the float64 einsum version

                def loss(a, c):
                    out = interaction_triton(a, c, launch_mode=mode, config=cfg)
                    return jnp.sum(out.astype(jnp.float32) * cot)

                if dj is None:
                    dx = jax.jit(jax.grad(lambda a: loss(a, None)))(xj)
                else:
                    dx, ddense = jax.jit(jax.grad(loss, argnums=(0, 1)))(xj, dj)
                    rows.append(("ddense", err_of(ddense, want_dd), tol))
                rows.append(("dx", err_of(dx, want_dx), tol))
                return rows

            name = f"B{b} F{f} D{d} Dd{dd}" + ("" if cfg is None else f" pinned {cfg}")
            R.run("interaction", "pairwise_interaction", name, dtype, mode, checks)


# --------------------------------------------------------------------------- MoE grouped matmul

GMM_CASES = [  # tiles per expert, rows per tile, K, N
    ([2, 0, 3, 1], 16, 24, 40), ([0, 4, 0], 16, 33, 17), ([1, 1], 128, 64, 64),
    ([17, 17, 18, 16, 17, 17, 17, 17], 512, 512, 1024), ([17, 17, 18, 16, 17, 17, 17, 17], 512, 1024, 512),
]


def run_moe(R, G, modes=None):
    """grouped_matmul_triton (forward, dx, dw) against float64 loops, every autotune
    configuration pinned at the base shape, and a MoE layer with moe.kernel=triton against the
    same layer with the XLA formulation (output and every gradient). With ``modes`` (e.g.
    ("torch",), the poisoned-output launcher) only the kernel cases run, in those modes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from genrec_jax.config import MoEConfig
    from genrec_jax.kernels import grouped_matmul as kg
    from genrec_jax.kernels import launch
    from genrec_jax.kernels.grouped_matmul import grouped_matmul_triton
    from genrec_jax.model.moe import MoEFFN

    cases = [(c, dt, None) for c in GMM_CASES for dt in ("float32", "bfloat16")]
    if modes is None:
        cases += [(GMM_CASES[3], "bfloat16", cfg) for cfg in launch.autotune_configs(kg.autotuned("fwd"))]
    for ((counts, m, k, n), dtype, cfg), mode in itertools.product(cases, modes or (MODE["main"],)):
        def checks(counts=counts, m=m, k=k, n=n, dtype=dtype, cfg=cfg, mode=mode):
            x, w, te, g = G.inputs(counts, m, k, n, seed("gmm", m, k, n, dtype), getattr(jnp, dtype))
            fn = jax.jit(lambda a, b: jax.vjp(lambda a, b: grouped_matmul_triton(a, b, te, launch_mode=mode,
                                                                                 config=cfg), a, b))
            gq = jnp.asarray(g, x.dtype)
            out, vjp = fn(x, w)
            dx, dw = jax.jit(vjp)(gq)
            want = G.loops64(x.astype(jnp.float32), w.astype(jnp.float32), te, np.asarray(gq.astype(jnp.float32)))
            tol = 1e-5 if dtype == "float32" else 1e-2
            return [(what, err_of(got, ref), tol) for what, got, ref in zip(("out", "dx", "dw"), (out, dx, dw), want)]

        name = f"tiles{sum(counts)} E{len(counts)} M{m} K{k} N{n}" + ("" if cfg is None else f" pinned {cfg}")
        R.run("moe", "grouped_matmul", name, dtype, mode, checks)

    if modes is not None:
        return
    mode = MODE["main"]
    for dtype in ("float32", "bfloat16"):
        def layer(dtype=dtype):
            dt = getattr(jnp, dtype)
            t, d = 4096, 256
            x = jnp.asarray(np.random.default_rng(7).standard_normal((t, d)), dt)
            outs = {}
            for kern in ("xla", "triton"):
                moe = MoEFFN(d, MoEConfig(num_experts=8, top_k=2, expert_dim=512, block_size=512, kernel=kern),
                             rngs=nnx.Rngs(0), dtype=dt)
                gd, params = nnx.split(moe)

                def loss(p, x):
                    y, aux = nnx.merge(gd, p)(x)
                    return jnp.sum(jnp.tanh(y.astype(jnp.float32))) + aux["moe_balance_loss"], y

                # float32: XLA's own products at full precision (its GPU default is TF32)
                with jax.default_matmul_precision("highest"):
                    (_, y), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
                outs[kern] = (y, gx, gp)
            tol = 1e-5 if dtype == "float32" else 2e-2
            (y0, gx0, gp0), (y1, gx1, gp1) = outs["xla"], outs["triton"]
            ref = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
            rows = [("out", err_of(y1, ref(y0)), tol), ("dx", err_of(gx1, ref(gx0)), tol)]
            for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gp0)[0], jax.tree.leaves(gp1)):
                rows.append((f"d{jax.tree_util.keystr(path)[-12:]}", err_of(b, ref(a)), tol))
            return rows

        R.run("moe", "MoEFFN kernel=triton", "T4096 D256 E8 k2 F512 block512", dtype, mode, layer)


# --------------------------------------------------------------------------- sharded


def run_sharded(R, A, I):
    """The dispatching ops (backend="triton") inside a sharded jit over every GPU present: the
    kernels run once per shard (``genrec_jax.sharding.per_shard``) and forward and gradients
    still equal the float64 oracle on the whole batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from genrec_jax.config import MeshConfig
    from genrec_jax.ops.hstu_attention import hstu_attention
    from genrec_jax.ops.interaction import pairwise_interaction
    from genrec_jax.sharding import make_mesh

    n_dev = len(jax.devices())
    if n_dev < 2:
        print("sharded: one device visible, nothing to shard (run on a machine with several GPUs)", flush=True)
        return
    meshes = {f"data={n_dev}": (MeshConfig(data=n_dev), P("data", None, None, None)),
              f"tensor={n_dev}": (MeshConfig(data=1, tensor=n_dev), P(None, None, "tensor", None))}
    for dtype in ("float32", "bfloat16"):
        for name, (mcfg, spec) in meshes.items():
            def checks(dtype=dtype, mcfg=mcfg, spec=spec):
                mesh = make_mesh(mcfg)
                b, n, h, d = 2 * n_dev, cap(200, 24), 2 * n_dev, cap(64, 16)
                rng = np.random.default_rng(seed("sharded", dtype, str(mcfg)))
                p = A.make_problem(rng, b, n, h, d, d, targets=True)
                args = A.problem_args(p, dtype)
                sh = NamedSharding(mesh, spec)
                args[:3] = [jax.device_put(x, sh) for x in args[:3]]
                cot = rng.standard_normal((b, n, h, d)).astype(np.float32)

                def loss(q, k, v, pos, tb):
                    out = hstu_attention(q, k, v, args[3], max_len=n, norm="causal_count", num_targets=args[4],
                                         pos_bias=pos, time_bias=tb, timestamps=args[7], query_timestamps=args[8],
                                         backend="triton")
                    return jnp.sum(out.astype(jnp.float32) * cot), out

                with jax.set_mesh(mesh):
                    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
                        *args[:3], args[5], args[6])
                cast = {k: np.asarray(jnp.asarray(p[k]).astype(dtype).astype(jnp.float32)) for k in "qkv"}
                cot_seen = np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32))
                want, want_g = A.oracle(cast["q"], cast["k"], cast["v"], A.problem_terms(p, n), p["pos_bias"],
                                        p["time_bias"], alpha=1 / math.sqrt(d), norm="causal_count", max_len=n,
                                        cotangent=cot_seen)
                tol = A.tolerance(dtype)
                rows = [("out", err_of(out, want), tol)]
                rows += [(f"d{k}", err_of(gk, wk), tol) for k, gk, wk in zip(("q", "k", "v", "pos_bias", "time_bias"),
                                                                            g, want_g)]
                return rows

            R.run("sharded", "hstu_attention", f"{name} B{2 * n_dev} N{cap(200, 24)} H{2 * n_dev} D{cap(64, 16)} rab targets", dtype,
                  MODE["main"], checks)

        def inter_checks(dtype=dtype):
            mesh = make_mesh(MeshConfig(data=n_dev))
            rng = np.random.default_rng(seed("sharded-interaction", dtype))
            x, dense = I._inputs(rng, cap(64, 4) * n_dev, cap(50, 12), cap(128, 16), 13, getattr(jnp, dtype))
            sh = NamedSharding(mesh, P("data", None, None))
            xj = jax.device_put(jnp.asarray(x).astype(dtype), sh)
            dj = jax.device_put(jnp.asarray(dense).astype(dtype), NamedSharding(mesh, P("data", None)))
            f = x.shape[1]
            cot = rng.standard_normal((x.shape[0], 13 + f * (f - 1) // 2)).astype(np.float32)

            def loss(a, c):
                out = pairwise_interaction(a, c, backend="triton")
                return jnp.sum(out.astype(jnp.float32) * cot), out

            with jax.set_mesh(mesh):
                (_, out), (dx, dd) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(xj, dj)
            want_dx, want_dd = I.grads64(x, dense, np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32)))
            tol = 1e-5 if dtype == "float32" else 1e-2
            return [("out", err_of(out, I.loop64(x, dense)), tol), ("dx", err_of(dx, want_dx), tol),
                    ("ddense", err_of(dd, want_dd), tol)]

        R.run("sharded", "pairwise_interaction", f"data={n_dev} B{cap(64, 4) * n_dev} F{cap(50, 12)} D{cap(128, 16)} Dd13", dtype, MODE["main"],
              inter_checks)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write one JSON object per check row to this path")
    ap.add_argument("--only", default=",".join(ALL_GROUPS), help=f"comma-separated groups of {ALL_GROUPS}")
    ap.add_argument("--interpret", action="store_true",
                    help="development: run the checks through the Triton CPU interpreter at capped sizes")
    args = ap.parse_args(argv)
    if args.interpret:
        MODE.update(main="interpret", small=True)
        ok, why = True, ""
    else:
        ok, why = gpu_ready()
    if not ok:
        print(f"gpu_check: cannot run: {why}. This script needs a CUDA GPU with jax[cuda] and jax-triton "
              "(pip install 'genrec-jax[gpu]').", file=sys.stderr)
        return 2
    import jax

    from tests.kernels import test_hstu_attention_kernel as A
    from tests.kernels import test_interaction_kernel as I

    groups = set(args.only.split(","))
    have_torch = True
    try:
        import torch

        have_torch = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        have_torch = False
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; groups {sorted(groups)}", flush=True)
    R = Runner()
    t0 = time.time()
    if "attention" in groups:
        run_attention(R, A)
    if "reference" in groups and not args.interpret:
        run_reference_grad(R, A)
    if "jagged" in groups:
        run_jagged(R, A)
    if "configs" in groups:
        run_config_sweep(R, A)
    if "cached" in groups:
        run_cached(R, A)
    if "interaction" in groups:
        run_interaction(R, I)
    if "sharded" in groups and not args.interpret:
        run_sharded(R, A, I)
    if "moe" in groups:
        from tests.kernels import test_grouped_matmul_kernel as G

        run_moe(R, G)
    if "torch" in groups and not args.interpret:
        if have_torch:
            run_attention(R, A, modes=("torch",), cases=ATTN_CASES[:3])
            run_cached(R, A, modes=("torch",))
            run_interaction(R, I, modes=("torch",))
            from tests.kernels import test_grouped_matmul_kernel as G

            run_moe(R, G, modes=("torch",))
        else:
            print("torch with CUDA not available: skipping the poisoned-output (torch) checks", flush=True)

    fails = [r for r in R.rows if r["status"] != "PASS"]
    print("\n" + "=" * 120)
    print(f"{'status':6s} {'kernel':22s} {'case':44s} {'dtype':9s} {'mode':10s} {'check':12s} "
          f"{'error':>9s} {'tol':>7s}")
    for r in R.rows:
        print(f"{r['status']:6s} {r['kernel']:22s} {r['case'][:44]:44s} {r['dtype']:9s} {r['mode']:10s} "
              f"{r['check']:12s} {r['error']:9.2e} {r['tol']:7.0e}")
    print(f"{len(R.rows) - len(fails)} PASS, {len(fails)} FAIL in {time.time() - t0:.0f} s")
    write_rows(args.json, R.rows)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

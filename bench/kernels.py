#!/usr/bin/env python
"""Time the Triton kernels against the jit'ed XLA references on a CUDA GPU.

    python bench/kernels.py [--json out.json] [--plot speed.png] [--ns 256,1024,4096,8192]

HSTU attention: B=32, H=4, D=128, bf16, lengths uniform in [N/2, N] (padded [B, N, H, D]),
with no relative bias and with the full rab (position + time tables), forward and
forward+backward (gradients of q, k, v and the bias tables), Triton vs the XLA reference.

    TFLOP/s counts valid causal pairs only:  forward = 4 * H * D * sum_b len_b^2 / 2
                                              backward = 2.5 * forward  (fwd+bwd = 3.5 * forward)

(2 matmuls of 2*D flop per visible pair forward; 5 backward: S recomputed, dA = dO V^T,
dV, dK, dQ; elementwise SiLU/bias work is not counted.)

Decode (cached) attention and the pairwise interaction (F in {16, 50, 128}, D=128, B=4096)
are reported in GB/s of compulsory traffic, next to a measured device-to-device copy.

Timing: the function under test is applied to R distinct input sets (R = 3) inside one jit,
so one dispatch from Python launches R kernels (or R copies of the XLA reference) back to
back; that executable is warmed up (compilation and jax-triton autotuning), then run in
rounds of k calls (k sized so a round lasts >= 25 ms) with one ``block_until_ready`` per
round. Reported: the median over rounds of (round time / (k R)), with the min-max spread.
Timing each call separately would add Python's per-dispatch cost to every call, which is
as long as the whole kernel at the small shapes (interaction, decode, N = 256): before this
the interaction rows at F = 16 and F = 50 both read ~0.04 ms. Exits 2 with a message without
a GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import pyplot, write_rows  # noqa: E402


def gpu_ready() -> tuple[bool, str]:
    try:
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            return False, f"no CUDA GPU visible to jax (devices: {jax.devices()})"
        import jax_triton  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def bench(fn, arg_sets, rounds: int = 15, min_round_s: float = 0.025):
    """Median seconds per call of ``fn`` (and min, max over rounds): ``fn`` applied to every
    tuple in ``arg_sets`` within one jit; see the module docstring."""
    import jax

    reps = len(arg_sets)
    multi = jax.jit(lambda sets: [fn(*args) for args in sets])
    sets = [tuple(a) for a in arg_sets]
    jax.block_until_ready(multi(sets))  # compile, autotune, warm caches
    t0 = time.perf_counter()
    jax.block_until_ready(multi(sets))
    one = max(time.perf_counter() - t0, 1e-6)
    k = max(1, min(500, int(min_round_s / one)))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(k):
            out = multi(sets)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / (k * reps))
    return statistics.median(per_call), min(per_call), max(per_call)


def is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "Out of memory" in s


# --------------------------------------------------------------------------- measurements


def copy_bandwidth() -> float:
    """Device-to-device copy in bytes/s (read + write), 2 GiB buffer."""
    try:
        import torch

        if torch.cuda.is_available():
            x = torch.randn(2**29, device="cuda")  # 2 GiB
            y = torch.empty_like(x)
            for _ in range(3):
                y.copy_(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                y.copy_(x)
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            del x, y
            torch.cuda.empty_cache()
            return 2 * 2**31 / statistics.median(times)
    except Exception:  # noqa: BLE001
        pass
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (2**29,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    med, _, _ = bench(f, [(x,)])
    return 2 * 2**31 / med


def reference_gathered_bias(q, k, v, lengths, *, alpha, max_len, norm, pos_bias=None, time_bias=None,
                            timestamps=None, query_timestamps=None):
    """The XLA reference with the bias as a plain gather over [B, N, N] indices (its gradient
    a scatter-add): the formulation the reference used before its scatter-free bias."""
    import jax.numpy as jnp

    from genrec_jax.ops import hstu_attention as ops

    n = q.shape[1]
    pos = ops.token_positions(lengths, n, None)
    rel = jnp.clip(pos[:, :, None] - pos[:, None, :], 0, pos_bias.shape[0] - 1)
    dt = query_timestamps[:, :, None] - timestamps[:, None, :]
    bias = pos_bias[rel] + time_bias[ops.time_bucket(dt, time_bias.shape[0])]
    return ops.hstu_attention_dense(q, k, v, ops.attention_mask(lengths, n), bias[:, None], alpha=alpha, norm=norm,
                                    max_len=max_len)


def _cfg_label(cfg: dict) -> str:
    keys = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_B": "B", "BLOCK_I": "I", "ROW_STAGES": "R", "EARLY_S": "E",
            "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{keys.get(k, k)}{v}" for k, v in cfg.items())


def wide_configs(kind: str, head_dim: int, rab: bool) -> list[dict]:
    """The autotuning candidates of ``kind`` plus more tile shapes, warps and pipeline depths
    (``--configs wide``: exploring which candidates to ship)."""
    from genrec_jax.kernels import hstu_attention as ka
    from genrec_jax.kernels import launch

    out = launch.autotune_configs(ka.autotuned(kind, head_dim, rab))
    if head_dim <= 128:
        if kind in ("fwd", "dq"):
            grid = [(64, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3), (128, 64, 4, 2), (128, 64, 4, 3),
                    (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 8, 4), (64, 16, 4, 3)]
        else:  # bwd: BLOCK_N % BLOCK_M == 0
            grid = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 4), (64, 64, 4, 2), (64, 64, 4, 3),
                    (32, 64, 4, 3), (16, 128, 8, 3), (64, 128, 8, 1)]
        for bm, bn, w, st in grid:
            for early in ((0, 1) if kind == "fwd" else (None,)):
                c = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                if early is not None:
                    c = dict(BLOCK_M=bm, BLOCK_N=bn, EARLY_S=early, num_warps=w, num_stages=st)
                if c not in out:
                    out.append(c)
    return out


def pick_config(make_fn, candidates, args, label, verbose):
    """Time ``make_fn(cfg)`` for every candidate (pinned, no autotuner); return the fastest
    (cfg, (median, min, max)). Failing candidates (e.g. too much shared memory) are skipped."""
    best = None
    for cfg in candidates:
        try:
            t = bench(make_fn(cfg), args, rounds=7)
        except Exception as e:  # noqa: BLE001
            if verbose:
                print(f"    {label} [{_cfg_label(cfg)}]: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if verbose:
            print(f"    {label} [{_cfg_label(cfg)}]: {t[0] * 1e3:.3f} ms", flush=True)
        if best is None or t[0] < best[1][0]:
            best = (cfg, t)
    if best is None:
        raise RuntimeError(f"{label}: no configuration ran")
    return best


def attention_rows(ns, b, h, d, rabs, skip_xla_above, only_impls=(), configs="sweep", verbose=False):
    """``configs``: "sweep" times every autotuning candidate pinned and reports the fastest
    (the forward's first, then the backward's with that forward, then the separate dQ's);
    "wide" does the same over a larger grid; "first" pins each kernel's first candidate (what
    ``GENREC_TRITON_AUTOTUNE=0`` runs); "autotune" leaves it to jax-triton's autotuner."""
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels import hstu_attention as ka
    from genrec_jax.kernels import launch
    from genrec_jax.kernels.hstu_attention import hstu_attention_triton
    from genrec_jax.ops.hstu_attention import hstu_attention_reference

    rows = []
    for n in ns:
        rng = np.random.default_rng(n)
        lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
        lengths[0] = n
        pairs = float(np.sum(lengths.astype(np.float64) ** 2) / 2)
        fwd_flop = 4 * h * d * pairs
        sets = []
        for s in range(3):
            key = jax.random.PRNGKey(1000 * n + s)
            kq, kk, kv, kt = jax.random.split(key, 4)
            q = jax.random.normal(kq, (b, n, h, d), jnp.bfloat16)
            k = jax.random.normal(kk, (b, n, h, d), jnp.bfloat16)
            v = jax.random.normal(kv, (b, n, h, d), jnp.bfloat16)
            ts = jnp.cumsum(jax.random.randint(kt, (b, n), 0, 5000), axis=1).astype(jnp.int32)
            qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)
            sets.append(dict(q=q, k=k, v=v, lengths=jnp.asarray(lengths), ts=ts, qts=qts,
                             pb=jax.random.normal(kq, (n + 1,), jnp.float32) * 0.1,
                             tb=jax.random.normal(kk, (64,), jnp.float32) * 0.1,
                             cot=jax.random.normal(kt, (b, n, h, d), jnp.bfloat16)))
        arg_f = [(s["q"], s["k"], s["v"], s["lengths"], s["pb"], s["tb"], s["ts"], s["qts"]) for s in sets]
        arg_b = [a + (s["cot"],) for a, s in zip(arg_f, sets)]
        for rab in rabs:
            impls = ("triton", "triton-atomic", "triton-exact", "triton-tanh", "triton-dqsep", "triton-dqst",
                     "xla") + (
                ("xla-gather",) if rab == "pos+time" else ())
            chosen = {}  # kernel kind -> pinned config, filled by the sweep of the first Triton impl
            for impl in impls:
                if only_impls and impl not in only_impls:
                    continue
                attn = {"xla": hstu_attention_reference, "xla-gather": reference_gathered_bias}.get(
                    impl, hstu_attention_triton)
                base_kw = dict(alpha=1 / math.sqrt(d), max_len=n, norm="max_len")
                if impl == "triton-dqsep":
                    base_kw["dq_mode"] = "separate"
                if impl == "triton-dqst":  # dS stored by the key-major kernel, dQ one product over it
                    base_kw["dq_mode"] = "stored"
                if impl == "triton-atomic":  # dQ by f32 atomics whatever the length ("triton": dq_mode="auto")
                    base_kw["dq_mode"] = "atomic"
                if impl == "triton-exact":  # the kernel with the two-MUFU sigmoid (A/B of the tanh form)
                    base_kw["sigmoid"] = "exact"
                if impl == "triton-tanh":  # tanh.approx in every pass, also the forward with a bias
                    base_kw["sigmoid"] = "tanh"

                def make(extra=None, attn=attn, base_kw=base_kw, rab=rab):
                    kw = dict(base_kw, **(extra or {}))

                    def call(q, k, v, lengths, pb, tb, ts, qts):
                        if rab == "pos+time":
                            return attn(q, k, v, lengths, pos_bias=pb, time_bias=tb, timestamps=ts,
                                        query_timestamps=qts, **kw)
                        return attn(q, k, v, lengths, **kw)

                    def fwd_bwd(q, k, v, lengths, pb, tb, ts, qts, cot):
                        out, vjp = jax.vjp(lambda q_, k_, v_, pb_, tb_: call(q_, k_, v_, lengths, pb_, tb_, ts, qts),
                                           q, k, v, pb, tb)
                        return out, vjp(cot)

                    return call, fwd_bwd

                pins = {}
                is_triton = impl.startswith("triton")
                if is_triton and configs in ("sweep", "wide"):
                    rab_flag = rab != "none"
                    cands = (lambda kind: wide_configs(kind, d, rab_flag)) if configs == "wide" else (
                        lambda kind: launch.autotune_configs(ka.autotuned(kind, d, rab_flag)))
                    tag = f"{impl} N={n} rab={rab}"
                    if "fwd" not in chosen:
                        chosen["fwd"] = pick_config(lambda c: make({"fwd_config": c})[0], cands("fwd"), arg_f,
                                                    f"{tag} fwd", verbose)[0]
                    pins["fwd_config"] = chosen["fwd"]
                    if "bwd" not in chosen:
                        chosen["bwd"] = pick_config(lambda c: make(dict(pins, bwd_config=c))[1], cands("bwd"),
                                                    arg_b, f"{tag} bwd", verbose)[0]
                    pins["bwd_config"] = chosen["bwd"]
                    if impl == "triton-dqsep":  # its backward kernel has no dQ product: its own sweep
                        if "bwd_sep" not in chosen:
                            chosen["bwd_sep"] = pick_config(lambda c: make(dict(pins, bwd_config=c))[1],
                                                            cands("bwd"), arg_b, f"{tag} bwd", verbose)[0]
                        pins["bwd_config"] = chosen["bwd_sep"]
                        if "dq" not in chosen:
                            chosen["dq"] = pick_config(lambda c: make(dict(pins, dq_config=c))[1], cands("dq"),
                                                       arg_b, f"{tag} dq", verbose)[0]
                        pins["dq_config"] = chosen["dq"]
                    if impl == "triton-dqst":  # its own pair: backward configs sharing one BLOCK_N, then dQ
                        if configs == "wide":
                            raise SystemExit("--configs wide does not cover triton-dqst; use sweep or first")
                        kinds = {"bwd": ka.autotuned("bwds", d, rab_flag)}
                        if "bwd_st" not in chosen:
                            chosen["bwd_st"] = pick_config(lambda c: make(dict(pins, bwd_config=c))[1],
                                                           launch.autotune_configs(kinds["bwd"]), arg_b,
                                                           f"{tag} bwd", verbose)[0]
                        pins["bwd_config"] = chosen["bwd_st"]
                        slab = chosen["bwd_st"]["BLOCK_N"]
                        if "dq_st" not in chosen:
                            chosen["dq_st"] = pick_config(lambda c: make(dict(pins, dq_config=c))[1],
                                                          launch.autotune_configs(ka.autotuned("dqs", d, rab_flag,
                                                                                               slab)),
                                                          arg_b, f"{tag} dq", verbose)[0]
                        pins["dq_config"] = chosen["dq_st"]
                elif is_triton and configs == "first" and impl == "triton-dqst":
                    bwd0 = launch.autotune_configs(ka.autotuned("bwds", d, rab != "none"))[0]
                    pins.update(fwd_config=launch.autotune_configs(ka.autotuned("fwd", d, rab != "none"))[0],
                                bwd_config=bwd0,
                                dq_config=launch.autotune_configs(ka.autotuned("dqs", d, rab != "none",
                                                                               bwd0["BLOCK_N"]))[0])
                elif is_triton and configs == "first":
                    for kind in ("fwd", "bwd", "dq"):
                        pins[f"{kind}_config"] = launch.autotune_configs(ka.autotuned(kind, d, rab != "none"))[0]
                fwd, fwd_bwd = make(pins)
                passes = (("fwd", fwd, arg_f, fwd_flop), ("fwd+bwd", fwd_bwd, arg_b, 3.5 * fwd_flop))
                for what, fn, args, flop in passes:
                    if impl in ("triton-atomic", "triton-dqsep", "triton-dqst") and what == "fwd":
                        continue  # same forward kernel as "triton"
                    row = dict(kernel="hstu_attention", impl=impl, pass_=what, rab=rab, B=b, N=n, H=h, D=d,
                               dtype="bfloat16", flop=flop)
                    if pins:
                        row["configs"] = {k.removesuffix("_config"): v for k, v in pins.items()
                                          if what == "fwd+bwd" or k == "fwd_config"}
                    if impl.startswith("xla") and skip_xla_above and n > skip_xla_above:
                        row.update(status="skipped")
                    else:
                        try:
                            med, lo, hi = bench(fn, args)
                            row.update(status="ok", ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3,
                                       tflops=flop / med / 1e12)
                        except Exception as e:  # noqa: BLE001
                            row.update(status="OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:160]}")
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


def cached_rows(copy_bw):
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels.hstu_attention import hstu_attention_cached_triton

    rows = []
    b, h, d, c = 32, 4, 128, 4096
    for m in (1, 64):
        sets = []
        for s in range(3):
            ks = jax.random.split(jax.random.PRNGKey(77 + s), 3)
            sets.append((jax.random.normal(ks[0], (b, m, h, d), jnp.bfloat16),
                         jax.random.normal(ks[1], (b, c, h, d), jnp.bfloat16),
                         jax.random.normal(ks[2], (b, c, h, d), jnp.bfloat16)))
        hist = jnp.full((b,), c - m, jnp.int32)
        qp = jnp.broadcast_to(c - m + jnp.arange(m, dtype=jnp.int32), (b, m))
        fn = jax.jit(lambda q, kc, vc: hstu_attention_cached_triton(
            q, kc, vc, qp, hist + m, max_len=c, hist_lengths=hist if m > 1 else None))
        nbytes = 2 * b * c * h * d * 2 + 2 * b * m * h * d * 2
        row = dict(kernel="hstu_attention_cached", impl="triton", pass_="fwd", rab="none", B=b, N=c, M=m, H=h, D=d,
                   dtype="bfloat16", bytes=nbytes)
        try:
            med, lo, hi = bench(fn, sets)
            row.update(status="ok", ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3, gbs=nbytes / med / 1e9,
                       frac_of_copy=nbytes / med / copy_bw)
        except Exception as e:  # noqa: BLE001
            row.update(status=f"error: {type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def interaction_rows(fs, b, d, copy_bw, configs="sweep", verbose=False):
    import jax
    import jax.numpy as jnp

    from genrec_jax.kernels import interaction as ki
    from genrec_jax.kernels import launch
    from genrec_jax.kernels.interaction import interaction_triton
    from genrec_jax.ops.interaction import pairwise_interaction_reference

    rows = []
    for f in fs:
        p = f * (f - 1) // 2
        sets = [(jax.random.normal(jax.random.PRNGKey(s), (b, f, d), jnp.bfloat16),
                 jax.random.normal(jax.random.PRNGKey(50 + s), (b, p), jnp.bfloat16)) for s in range(3)]
        for impl in ("triton", "xla"):
            def make(cfg=None, impl=impl):
                op = pairwise_interaction_reference if impl == "xla" else functools.partial(interaction_triton,
                                                                                            config=cfg)
                return (lambda x, ct: op(x)), (lambda x, ct: jax.vjp(op, x)[1](ct)[0])

            for what, idx, nbytes in (("fwd", 0, b * f * d * 2 + b * p * 2), ("bwd", 1, b * p * 2 + 2 * b * f * d * 2)):
                row = dict(kernel="pairwise_interaction", impl=impl, pass_=what, rab="", B=b, F=f, D=d,
                           dtype="bfloat16", bytes=nbytes)
                try:
                    cfg = None
                    if impl == "triton" and configs != "autotune":
                        cands = launch.autotune_configs(ki.autotuned(what, ki._block_f(f)))
                        cfg = cands[0] if configs == "first" else pick_config(
                            lambda c: make(c)[idx], cands, sets, f"interaction F={f} {what}", verbose)[0]
                        row["configs"] = {what: cfg}
                    med, lo, hi = bench(make(cfg)[idx], sets)
                    row.update(status="ok", ms=med * 1e3, ms_min=lo * 1e3, ms_max=hi * 1e3, gbs=nbytes / med / 1e9,
                               frac_of_copy=nbytes / med / copy_bw)
                except Exception as e:  # noqa: BLE001
                    row.update(status=f"error: {type(e).__name__}: {str(e)[:160]}")
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


# --------------------------------------------------------------------------- output


def format_row(r: dict) -> str:
    shape = " ".join(f"{k}={r[k]}" for k in ("B", "N", "M", "F", "H", "D") if k in r)
    head = f"{r['kernel']:22s} {r['impl']:12s} {r['pass_']:8s} {r.get('rab', ''):9s} {shape:34s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}"
    out = f"{head} {r['ms']:9.3f} ms [{r['ms_min']:.3f}-{r['ms_max']:.3f}]"
    if "tflops" in r:
        out += f" {r['tflops']:7.1f} TFLOP/s"
    if "gbs" in r:
        out += f" {r['gbs']:7.0f} GB/s ({100 * r['frac_of_copy']:.0f}% of copy)"
    if r.get("configs"):
        out += "  [" + "; ".join(f"{k}: {_cfg_label(v)}" for k, v in r["configs"].items()) + "]"
    return out


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("fwd", "fwd+bwd")):
        for impl in ("triton", "triton-exact", "triton-tanh", "triton-dqsep", "xla", "xla-gather"):
            for rab in sorted({r["rab"] for r in rows if r["kernel"] == "hstu_attention"}):
                pts = [(r["N"], r["tflops"]) for r in rows if r["kernel"] == "hstu_attention" and r["impl"] == impl
                       and r["pass_"] == what and r["rab"] == rab and r.get("status") == "ok"]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker="o", label=f"{impl}, rab={rab}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (max length; lengths uniform in [N/2, N])")
        ax.set_ylabel("TFLOP/s (valid causal pairs)")
        ax.set_title(f"HSTU attention {what}, B=32 H=4 D=128 bf16")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write one JSON object per row")
    ap.add_argument("--plot", help="write a PNG of TFLOP/s vs N (needs matplotlib)")
    ap.add_argument("--ns", default="256,1024,4096,8192")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rab", default="none,pos+time", help="comma list of: none, pos+time")
    ap.add_argument("--skip-xla-above", type=int, default=0, help="skip the XLA reference above this N (0: never)")
    ap.add_argument("--interaction-fs", default="16,50,128")
    ap.add_argument("--only", default="attention,cached,interaction")
    ap.add_argument("--configs", default="sweep", choices=["sweep", "wide", "first", "autotune"],
                    help="Triton attention kernel configurations: time every autotuning candidate pinned and report "
                         "the fastest (sweep); the same over a larger grid (wide); each kernel's first candidate, "
                         "as GENREC_TRITON_AUTOTUNE=0 runs (first); or jax-triton's autotuner (autotune)")
    ap.add_argument("--verbose", action="store_true", help="print every configuration's time during the sweep")
    ap.add_argument("--impls", default="",
                    help="attention implementations to time (comma list of triton, triton-exact, triton-tanh, triton-dqsep, xla, "
                         "xla-gather; default: all that apply)")
    args = ap.parse_args(argv)
    ok, why = gpu_ready()
    if not ok:
        print(f"bench/kernels.py: needs a CUDA GPU with jax[cuda] and jax-triton; {why}", file=sys.stderr)
        return 2
    import jax

    only = set(args.only.split(","))
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (bytes read + written)", flush=True)
    rows = [dict(kernel="copy", impl="d2d", pass_="", status="ok", gbs=copy_bw / 1e9)]
    if "attention" in only:
        rows += attention_rows([int(x) for x in args.ns.split(",")], args.batch, args.heads, args.dim,
                               args.rab.split(","), args.skip_xla_above,
                               tuple(x for x in args.impls.split(",") if x), args.configs, args.verbose)
    if "cached" in only:
        rows += cached_rows(copy_bw)
    if "interaction" in only:
        rows += interaction_rows([int(x) for x in args.interaction_fs.split(",")], 4096, 128, copy_bw,
                                 args.configs, args.verbose)
    print("\n" + "=" * 130)
    print("TFLOP/s: forward = 4*H*D*sum(len^2)/2, backward = 2.5 x forward; GB/s: compulsory bytes / time")
    for r in rows[1:]:
        print(format_row(r))
    write_rows(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TMA-reduce dQ experiment: correctness of dq_mode in {atomic, tma} against the float32
reference, then fwd+bwd timing of separate / atomic / tma / store (timing only) dQ."""
import json, math, sys, time
sys.path.insert(0, ".devscripts/tma")
sys.path.insert(0, ".")
import jt_scratch
jt_scratch.install()
import jax, jax.numpy as jnp, numpy as np
import hstu_tma as T
from bench.kernels import bench
from genrec_jax.ops.hstu_attention import hstu_attention_reference as ref

rows = []


def emit(**r):
    rows.append(r)
    print(json.dumps(r), flush=True)


def make_inputs(b, n, h, d, dtype, seed, lengths=None):
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(n // 2, n + 1, b).astype(np.int32)
        lengths[0] = n
    key = jax.random.PRNGKey(seed)
    kq, kk, kv, kt, kc = jax.random.split(key, 5)
    q = jax.random.normal(kq, (b, n, h, d), dtype)
    k = jax.random.normal(kk, (b, n, h, d), dtype)
    v = jax.random.normal(kv, (b, n, h, d), dtype)
    ts = jnp.cumsum(jax.random.randint(kt, (b, n), 0, 5000), axis=1).astype(jnp.int32)
    qts = jnp.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1)
    pb = jax.random.normal(kq, (n + 1,), jnp.float32) * 0.1
    tb = jax.random.normal(kk, (64,), jnp.float32) * 0.1
    cot = jax.random.normal(kc, (b, n, h, d), dtype)
    return dict(q=q, k=k, v=v, lengths=jnp.asarray(lengths), ts=ts, qts=qts, pb=pb, tb=tb, cot=cot)


def grads(fn, s, rab, **kw):
    def call(q, k, v, pb, tb):
        if rab:
            return fn(q, k, v, s["lengths"], pos_bias=pb, time_bias=tb, timestamps=s["ts"],
                      query_timestamps=s["qts"], **kw)
        return fn(q, k, v, s["lengths"], **kw)
    out, vjp = jax.vjp(call, s["q"], s["k"], s["v"], s["pb"], s["tb"])
    return (out,) + tuple(vjp(s["cot"]))


def check(b, n, h, d, dtype, rab, modes, lengths=None, bwd_config=None, **extra):
    s = make_inputs(b, n, h, d, dtype, seed=n + d + b, lengths=lengths)
    s32 = {k_: (v_.astype(jnp.float32) if v_.dtype == dtype else v_) for k_, v_ in s.items()}
    want = jax.jit(lambda: grads(ref, s32, rab, alpha=1 / math.sqrt(d), max_len=n, norm="max_len"))()
    names = ("out", "dq", "dk", "dv", "dpos", "dtime")
    for mode in modes:
        try:
            got = jax.jit(lambda: grads(T.hstu_attention_triton, s, rab, alpha=1 / math.sqrt(d), max_len=n,
                                        norm="max_len", dq_mode=mode, bwd_config=bwd_config, **extra))()
            errs = {}
            for nm, g, w in zip(names, got, want):
                if not rab and nm in ("dpos", "dtime"):
                    continue
                g = np.asarray(g, np.float64); w = np.asarray(w, np.float64)
                errs[nm] = float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30)) if np.all(np.isfinite(g)) else float("nan")
            emit(kind="check", b=b, n=n, h=h, d=d, dtype=jnp.dtype(dtype).name, rab=rab, mode=mode,
                 cfg=str(bwd_config), extra=str(extra), worst=max(errs.values()), **errs)
        except Exception as e:  # noqa: BLE001
            emit(kind="check", b=b, n=n, h=h, d=d, mode=mode, error=f"{type(e).__name__}: {str(e)[:400]}")


def timing(b, n, h, d, rab, variants, rounds=15):
    sets = [make_inputs(b, n, h, d, jnp.bfloat16, seed=1000 * n + i) for i in range(3)]
    lengths = np.asarray(sets[0]["lengths"])
    flop_f = 4 * h * d * float(np.sum(lengths.astype(np.float64) ** 2) / 2)
    for label, mode, cfg, *more in variants:
        extra = more[0] if more else {}
        if mode == "fwdonly":
            def fb(q, k, v, lengths, pb, tb, ts, qts, cot, extra=extra):
                if rab:
                    return T.hstu_attention_triton(q, k, v, lengths, pos_bias=pb, time_bias=tb, timestamps=ts,
                                                   query_timestamps=qts, alpha=1 / math.sqrt(d), max_len=n,
                                                   norm="max_len")
                return T.hstu_attention_triton(q, k, v, lengths, alpha=1 / math.sqrt(d), max_len=n, norm="max_len")
        else:
          def fb(q, k, v, lengths, pb, tb, ts, qts, cot, mode=mode, cfg=cfg, extra=extra):
            s = dict(q=q, k=k, v=v, lengths=lengths, pb=pb, tb=tb, ts=ts, qts=qts, cot=cot)
            return grads(T.hstu_attention_triton, s, rab, alpha=1 / math.sqrt(d), max_len=n, norm="max_len",
                         dq_mode=mode, bwd_config=cfg, **extra)
        args = [(s["q"], s["k"], s["v"], s["lengths"], s["pb"], s["tb"], s["ts"], s["qts"], s["cot"]) for s in sets]
        try:
            med, lo, hi = bench(fb, args, rounds=rounds)
            emit(kind="time", b=b, n=n, h=h, d=d, rab=rab, variant=label, extra=str(extra), ms=med * 1e3, min_ms=lo * 1e3,
                 max_ms=hi * 1e3, tflops_fwd_bwd=3.5 * flop_f / med / 1e12)
        except Exception as e:  # noqa: BLE001
            emit(kind="time", n=n, variant=label, error=f"{type(e).__name__}: {str(e)[:400]}")



"""HSTU attention Triton kernels against a float64 oracle.

Three tiers:

* always run (NumPy/JAX only): the float64 oracle used below agrees with the loop definition
  in ``tests/ops``; the kernels' logarithm-free time bucket equals floor(2 log2(1 + dt)).
* Triton interpreter (needs ``triton`` and CPU ``torch``; CI installs neither, so these skip
  there): every kernel — forward, backward (dQ, dK, dV, d pos_bias, d time_bias), jagged,
  M-FALCON, cached — runs on the CPU through the same jax wrappers (``launch_mode
  ="interpret"``), outputs NaN-poisoned before launch, on fresh random inputs with ragged
  lengths (1, odd, the maximum) and odd head dims. Plus a static compile for sm_90.
* ``@pytest.mark.gpu``: the same checks through jax-triton on a CUDA device.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.kernels.markers import needs_gpu, needs_interpreter, needs_triton


def seed_of(*parts) -> int:
    """A stable seed per test case (fresh inputs per case, reproducible across runs)."""
    return zlib.crc32(repr(parts).encode())


# --------------------------------------------------------------------------- float64 oracle


def time_bucket64(dt, num_buckets):
    """The definition: min(floor(2 log2(1 + max(dt, 0))), T - 1), in float64."""
    dt = np.maximum(np.asarray(dt, np.float64), 0.0)
    return np.clip(np.floor(np.log2(1.0 + dt) * 2.0), 0, num_buckets - 1).astype(np.int64)


def self_attention_terms(lengths, n, num_targets, ts, qts, num_pos, num_buckets):
    """mask [B, N, N], relative-position index and time bucket [B, N, N] (numpy)."""
    lengths = np.asarray(lengths)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    L = lengths[:, None, None]
    mask = (j <= i) & (j < L) & (i < L)
    pos = np.broadcast_to(np.arange(n), (len(lengths), n))
    if num_targets is not None:
        hist = (lengths - np.asarray(num_targets))[:, None, None]
        mask = mask & ((j < hist) | (i == j))
        pos = np.minimum(np.arange(n)[None, :], hist[:, :, 0])
    rel = np.clip(pos[:, :, None] - pos[:, None, :], 0, num_pos - 1)
    bkt = None
    if ts is not None:
        bkt = time_bucket64(np.asarray(qts, np.int64)[:, :, None] - np.asarray(ts, np.int64)[:, None, :], num_buckets)
    return mask, rel, bkt


def cached_attention_terms(q_positions, kv_lengths, cache_len, hist_lengths, k_ts, q_ts, num_pos, num_buckets):
    qp = np.asarray(q_positions)[:, :, None]
    j = np.arange(cache_len)[None, None, :]
    mask = (j <= qp) & (j < np.asarray(kv_lengths)[:, None, None])
    k_pos = np.broadcast_to(np.arange(cache_len), (qp.shape[0], cache_len))
    q_pos = np.asarray(q_positions)
    if hist_lengths is not None:
        hist = np.asarray(hist_lengths)
        mask = mask & ((j < hist[:, None, None]) | (j == qp))
        k_pos = np.minimum(k_pos, hist[:, None])
        q_pos = np.minimum(q_pos, hist[:, None])
    rel = np.clip(q_pos[:, :, None] - k_pos[:, None, :], 0, num_pos - 1)
    bkt = None
    if k_ts is not None:
        bkt = time_bucket64(np.asarray(q_ts, np.int64)[:, :, None] - np.asarray(k_ts, np.int64)[:, None, :],
                            num_buckets)
    return mask, rel, bkt


def dense64(q, k, v, pos_bias, time_bias, mask, rel, bkt, *, alpha, norm, max_len, xp=np):
    """HSTU attention on explicit mask/bias indices; ``xp`` = numpy (float64) or jax.numpy
    (call under ``jax.enable_x64``)."""
    s = alpha * xp.einsum("bqhd,bkhd->bhqk", q, k)
    if pos_bias is not None:
        s = s + pos_bias[rel][:, None]
    if time_bias is not None:
        s = s + time_bias[bkt][:, None]
    sig = 0.5 * (1.0 + xp.tanh(0.5 * s))  # overflow-free sigmoid
    a = xp.where(mask[:, None], s * sig, 0.0)
    n = float(max_len) if norm == "max_len" else xp.maximum(mask.sum(-1), 1)[:, None, :, None]
    return xp.einsum("bhqk,bkhd->bqhd", a / n, v)


def _as64(x):
    return None if x is None else np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@functools.lru_cache(maxsize=None)
def _grad_oracle(alpha, norm, max_len, has_pos, has_time):
    def loss(q, k, v, pb, tb, mask, rel, bkt, cot):
        out = dense64(q, k, v, pb if has_pos else None, tb if has_time else None, mask, rel, bkt, alpha=alpha,
                      norm=norm, max_len=max_len, xp=jnp)
        return jnp.sum(out * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def oracle(q, k, v, terms, pos_bias, time_bias, *, alpha, norm, max_len, cotangent=None):
    """Float64 output (and, with ``cotangent``, jax.grad in float64 w.r.t. q, k, v, pos_bias,
    time_bias); 16-bit inputs are upcast exactly."""
    mask, rel, bkt = terms
    args = [_as64(x) for x in (q, k, v, pos_bias, time_bias)]
    out = dense64(*args, mask, rel, bkt, alpha=alpha, norm=norm, max_len=max_len)
    if cotangent is None:
        return out
    with jax.enable_x64(True):
        dummy = np.zeros(1)
        f = _grad_oracle(float(alpha), norm, max_len, pos_bias is not None, time_bias is not None)
        grads = f(*(dummy if a is None else a for a in args), mask, rel, np.zeros_like(rel) if bkt is None else bkt,
                  _as64(cotangent))
        grads = [np.asarray(g) for g in grads]
    return out, [g if a is not None else None for g, a in zip(grads, args)]


def rel_err(got, want) -> float:
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (an unwritten poisoned element?)"
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def make_problem(rng, b, n, h, dqk, dv, *, lengths=None, targets=False, pos=True, time=True, num_buckets=16):
    q = rng.standard_normal((b, n, h, dqk)).astype(np.float32)
    k = rng.standard_normal((b, n, h, dqk)).astype(np.float32)
    v = rng.standard_normal((b, n, h, dv)).astype(np.float32)
    if lengths is None:
        lengths = rng.integers(1, n + 1, b)
    lengths = np.asarray(lengths, np.int32)
    nt = np.minimum(rng.integers(0, 4, b), lengths - 1).astype(np.int32) if targets else None
    ts = np.cumsum(rng.integers(0, 5000, (b, n)), axis=1).astype(np.int32)
    qts = np.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1).astype(np.int32)
    return dict(
        q=q, k=k, v=v, lengths=lengths, num_targets=nt,
        pos_bias=(rng.standard_normal(n + 1) * 0.5).astype(np.float32) if pos else None,
        time_bias=(rng.standard_normal(num_buckets) * 0.5).astype(np.float32) if time else None,
        timestamps=ts if time else None, query_timestamps=qts if time else None,
    )


def problem_terms(p, n):
    num_pos = 1 if p["pos_bias"] is None else len(p["pos_bias"])
    num_buckets = 1 if p["time_bias"] is None else len(p["time_bias"])
    return self_attention_terms(p["lengths"], n, p["num_targets"], p["timestamps"], p["query_timestamps"], num_pos,
                                num_buckets)


def _jnp(x, dtype=None):
    if x is None:
        return None
    x = jnp.asarray(x)
    return x if dtype is None else x.astype(dtype)


ARRAY_KEYS = ("q", "k", "v", "lengths", "num_targets", "pos_bias", "time_bias", "timestamps", "query_timestamps")


def kernel_fn(*, norm, alpha, max_len, mode, **extra):
    """hstu_attention_triton over the problem's arrays (positional, ARRAY_KEYS order); one
    jit per configuration keeps the wrapper's jnp glue from compiling op by op."""
    from genrec_jax.kernels.hstu_attention import hstu_attention_triton

    def f(q, k, v, lengths, num_targets, pos_bias, time_bias, timestamps, query_timestamps):
        return hstu_attention_triton(q, k, v, lengths, alpha=alpha, max_len=max_len, norm=norm,
                                     num_targets=num_targets, pos_bias=pos_bias, time_bias=time_bias,
                                     timestamps=timestamps, query_timestamps=query_timestamps, launch_mode=mode,
                                     **extra)

    return f


def problem_args(p, dtype):
    return [_jnp(p[key], dtype if key in ("q", "k", "v") else None) for key in ARRAY_KEYS]


def run_kernel(p, *, dtype, norm, alpha, max_len, mode, **extra):
    return jax.jit(kernel_fn(norm=norm, alpha=alpha, max_len=max_len, mode=mode, **extra))(*problem_args(p, dtype))


def tolerance(dtype) -> float:
    return 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-2


# --------------------------------------------------------------------------- always run


def _bucket_bit_trick(dt, num_buckets):
    """NumPy twin of ``_time_bucket`` in the kernels (float32 bit pattern of 1 + dt)."""
    x = np.maximum(dt, 0).astype(np.float32) + np.float32(1.0)
    bits = x.view(np.int32).astype(np.int64)
    octave = (bits >> 23) - 127
    half = ((bits & 0x7FFFFF) >= 0x3504F4).astype(np.int64)
    return np.minimum(2 * octave + half, num_buckets - 1)


def test_kernel_time_bucket_formula_is_exact():
    dt = np.concatenate([np.arange(-5, 1 << 21), np.random.default_rng(0).integers(1 << 21, 1 << 24, 200_000)])
    for nb in (16, 64, 200):
        np.testing.assert_array_equal(_bucket_bit_trick(dt, nb), time_bucket64(dt, nb))


@needs_triton
def test_sigmoid_mode_selection():
    """fp32 keeps the exact sigmoid; 16-bit inputs take the tanh form, as inline PTX on the GPU
    and through exp in the interpreter; bad values are refused."""
    from genrec_jax.kernels.hstu_attention import _silu_mode

    assert _silu_mode("float32", "jax_triton") == 0
    assert _silu_mode("bfloat16", "jax_triton") == 2 and _silu_mode("float16", "torch") == 2
    assert _silu_mode("bfloat16", "interpret") == 1
    assert _silu_mode("bfloat16", "jax_triton", "exact") == 0 and _silu_mode("float32", "jax_triton", "tanh") == 2
    # with a relative bias the forward passes keep the exact form (measured faster), the backward not
    assert _silu_mode("bfloat16", "jax_triton", "auto", "fwd", True) == 0
    assert _silu_mode("bfloat16", "jax_triton", "auto", "cached", True) == 0
    assert _silu_mode("bfloat16", "jax_triton", "auto", "bwd", True) == 2
    assert _silu_mode("bfloat16", "jax_triton", "tanh", "fwd", True) == 2
    with pytest.raises(ValueError, match="sigmoid"):
        _silu_mode("bfloat16", "jax_triton", "fast")


def test_tanh_silu_identity():
    """The kernels' 16-bit SiLU h + h tanh(h) (h = s / 2) and sigmoid 0.5 + 0.5 tanh(s / 2)
    are s sigma(s) and sigma(s) (float64)."""
    s = np.random.default_rng(5).normal(0, 8, 10_000)
    sig = 1 / (1 + np.exp(-s))
    h = s / 2
    np.testing.assert_allclose(h + h * np.tanh(h), s * sig, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(0.5 + 0.5 * np.tanh(h), sig, rtol=1e-12, atol=1e-15)


def test_oracle_matches_loop_definition():
    from tests.ops.test_hstu_attention import numpy_hstu

    rng = np.random.default_rng(3)
    for targets in (False, True):
        for norm in ("max_len", "causal_count"):
            n = 9
            p = make_problem(rng, 3, n, 2, 4, 6, targets=targets)
            want = numpy_hstu(p["q"], p["k"], p["v"], p["lengths"], alpha=0.3, max_len=n, norm=norm,
                              num_targets=p["num_targets"], pos_bias=p["pos_bias"], time_bias=p["time_bias"],
                              ts=p["timestamps"], qts=p["query_timestamps"])
            got = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=0.3,
                         norm=norm, max_len=n)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cached_oracle_equals_full_sequence_rows():
    rng = np.random.default_rng(4)
    n, hist, c = 11, 7, 16
    p = make_problem(rng, 2, n, 2, 4, 4, lengths=[n, n], targets=False)
    full = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=0.5,
                  norm="causal_count", max_len=n)
    kc = np.zeros((2, c, 2, 4), np.float32)
    vc = np.zeros((2, c, 2, 4), np.float32)
    kts = np.zeros((2, c), np.int32)
    kc[:, :n], vc[:, :n], kts[:, :n] = p["k"], p["v"], p["timestamps"]
    qpos = np.broadcast_to(np.arange(hist, n), (2, n - hist))
    terms = cached_attention_terms(qpos, [n, n], c, None, kts, p["query_timestamps"][:, hist:], n + 1, 16)
    got = oracle(p["q"][:, hist:], kc, vc, terms, p["pos_bias"], p["time_bias"], alpha=0.5, norm="causal_count",
                 max_len=n)
    np.testing.assert_allclose(got, full[:, hist:], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- interpreter

FORWARD_CASES = [
    # dtype, norm, targets, pos, time, dqk, dv
    ("float32", "max_len", False, False, False, 16, 16),
    ("float32", "causal_count", True, True, True, 16, 24),
    ("float32", "max_len", False, True, False, 12, 20),
    ("float32", "causal_count", False, False, True, 32, 16),
    ("bfloat16", "causal_count", True, True, True, 16, 16),
]


def _check_forward(p, n, *, dtype, norm, mode, alpha=0.3, max_len=None, **extra):
    max_len = max_len or n
    got = run_kernel(p, dtype=dtype, norm=norm, alpha=alpha, max_len=max_len, mode=mode, **extra)
    cast = {k: (None if p[k] is None else np.asarray(jnp.asarray(p[k]).astype(dtype).astype(jnp.float32)))
            for k in ("q", "k", "v")}
    want = oracle(cast["q"], cast["k"], cast["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=alpha,
                  norm=norm, max_len=max_len)
    assert got.dtype == jnp.dtype(dtype)
    err = rel_err(got, want)
    assert err < tolerance(dtype), f"relative error {err:.2e}"
    out = np.asarray(got.astype(jnp.float32))
    for r, L in enumerate(p["lengths"]):
        assert np.all(out[r, L:] == 0.0), "padding rows must be exactly zero"


@needs_interpreter
@pytest.mark.parametrize("dtype,norm,targets,pos,time,dqk,dv", FORWARD_CASES)
def test_interpreter_forward_matches_float64(dtype, norm, targets, pos, time, dqk, dv):
    rng = np.random.default_rng(seed_of(dtype, norm, targets, pos, time, dqk))
    n = 37
    p = make_problem(rng, 3, n, 2, dqk, dv, lengths=[n, 1, rng.integers(2, n)], targets=targets, pos=pos, time=time)
    _check_forward(p, n, dtype=dtype, norm=norm, mode="interpret")


@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), b=st.integers(1, 3),
       norm=st.sampled_from(["max_len", "causal_count"]), targets=st.booleans(), pos=st.booleans(),
       time=st.booleans())
def test_interpreter_forward_random_shapes(seed, n, b, norm, targets, pos, time):
    rng = np.random.default_rng(seed)
    p = make_problem(rng, b, n, 2, 16, 16, targets=targets, pos=pos, time=time)
    _check_forward(p, n, dtype="float32", norm=norm, mode="interpret", max_len=n + 3)


EARLY_FWD = {"BLOCK_M": 16, "BLOCK_N": 16, "EARLY_S": 1, "num_warps": 4, "num_stages": 1}


@needs_interpreter
@pytest.mark.parametrize("dtype,norm,targets,pos,dqk,dv", [
    ("float32", "max_len", False, False, 16, 16),
    ("bfloat16", "causal_count", False, False, 32, 16),
    ("float32", "causal_count", True, False, 24, 40),  # head dims padded to the block: masked loads
    ("float32", "max_len", False, True, 16, 16),  # with a bias the plain range runs
])
def test_interpreter_forward_early_scores_matches_float64(dtype, norm, targets, pos, dqk, dv):
    """EARLY_S = 1 (the next key block's scores issued before this block's SiLU and AV):
    lengths with 0, 1, 2 and several whole unmasked key blocks before the diagonal."""
    rng = np.random.default_rng(seed_of(dtype, norm, targets, pos, dqk, dv) + 5)
    n = 70
    p = make_problem(rng, 4, n, 2, dqk, dv, lengths=[n, 1, 33, 47], targets=targets, pos=pos, time=False)
    _check_forward(p, n, dtype=dtype, norm=norm, mode="interpret", fwd_config=EARLY_FWD)


@needs_interpreter
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 80), b=st.integers(1, 3), targets=st.booleans())
def test_interpreter_forward_early_scores_random_shapes(seed, n, b, targets):
    rng = np.random.default_rng(seed)
    p = make_problem(rng, b, n, 2, 16, 16, targets=targets, pos=False, time=False)
    _check_forward(p, n, dtype="float32", norm="causal_count", mode="interpret", max_len=n + 3,
                   fwd_config=EARLY_FWD)


@needs_interpreter
@pytest.mark.parametrize("dq_mode", ["atomic", "separate", "stored"])
def test_interpreter_grouped_launch_order_matches_float64(monkeypatch, dq_mode):
    """The block-fastest launch order that long sequences use (GROUP_MIN_LEN lowered so a
    short problem takes it): every program still covers its own block, forward and backward,
    with padding rows and ragged lengths."""
    from genrec_jax.kernels import hstu_attention as ka

    monkeypatch.setattr(ka, "GROUP_MIN_LEN", 1)
    rng = np.random.default_rng(seed_of("grouped", dq_mode))
    n = 50
    p = make_problem(rng, 3, n, 2, 16, 16, lengths=[n, 1, 29], targets=True)
    _check_forward(p, n, dtype="float32", norm="causal_count", mode="interpret")
    _check_forward(p, n, dtype="float32", norm="max_len", mode="interpret", fwd_config=EARLY_FWD)
    _check_backward(p, n, dtype="float32", norm="causal_count", mode="interpret", dq_mode=dq_mode)


@needs_interpreter
def test_interpreter_jagged_forward_matches_float64():
    from genrec_jax.kernels.hstu_attention import hstu_attention_jagged_triton

    rng = np.random.default_rng(11)
    n = 33
    p = make_problem(rng, 4, n, 2, 16, 16, lengths=[33, 1, 17, 8], targets=True)
    want = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=0.25,
                  norm="causal_count", max_len=40)
    lengths = p["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    def pack(x):
        return np.concatenate([x[r, :L] for r, L in enumerate(lengths)])

    got = hstu_attention_jagged_triton(
        jnp.asarray(pack(p["q"])), jnp.asarray(pack(p["k"])), jnp.asarray(pack(p["v"])), jnp.asarray(offsets),
        max_seq_len=n, alpha=0.25, max_len=40, norm="causal_count", num_targets=jnp.asarray(p["num_targets"]),
        pos_bias=jnp.asarray(p["pos_bias"]), time_bias=jnp.asarray(p["time_bias"]),
        timestamps=jnp.asarray(pack(p["timestamps"])), query_timestamps=jnp.asarray(pack(p["query_timestamps"])),
        launch_mode="interpret")
    assert got.shape == (int(offsets[-1]), 2, 16)
    assert rel_err(got, pack(want)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("dq_mode", ["atomic", "stored"])
def test_interpreter_jagged_backward_matches_float64(dq_mode):
    """Packed sequences (no padding rows between them): gradients of q, k, v and both bias
    tables against float64, targets included; the stored dS is laid out per (sequence,
    head), whatever the packing."""
    from genrec_jax.kernels.hstu_attention import hstu_attention_jagged_triton

    rng = np.random.default_rng(13)
    n = 70
    p = make_problem(rng, 4, n, 2, 16, 16, lengths=[70, 1, 37, 8], targets=True)
    lengths = p["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    def pack(x):
        return np.concatenate([x[r, :L] for r, L in enumerate(lengths)])

    cot = rng.standard_normal(p["q"].shape).astype(np.float32)
    _, want = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=0.25,
                     norm="causal_count", max_len=n, cotangent=cot)

    def loss(q, k, v, pb, tb):
        out = hstu_attention_jagged_triton(
            q, k, v, jnp.asarray(offsets), max_seq_len=n, alpha=0.25, max_len=n, norm="causal_count",
            num_targets=jnp.asarray(p["num_targets"]), pos_bias=pb, time_bias=tb,
            timestamps=jnp.asarray(pack(p["timestamps"])), query_timestamps=jnp.asarray(pack(p["query_timestamps"])),
            dq_mode=dq_mode, launch_mode="interpret")
        return jnp.sum(out * jnp.asarray(pack(cot)))

    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(
        *(jnp.asarray(pack(p[x])) for x in "qkv"), jnp.asarray(p["pos_bias"]), jnp.asarray(p["time_bias"]))
    for name, g, w in zip(("q", "k", "v"), got[:3], want[:3]):
        assert rel_err(g, pack(w)) < 1e-5, name
    for name, g, w in zip(("pos_bias", "time_bias"), got[3:], want[3:]):
        assert rel_err(g, w) < 1e-5, name


BACKWARD_CASES = [  # dtype, norm, targets, pos, time, dq_mode
    ("float32", "causal_count", True, True, True, "atomic"),
    ("float32", "causal_count", True, True, True, "separate"),
    ("float32", "max_len", False, False, False, "atomic"),
    ("float32", "max_len", False, True, True, "separate"),
    ("bfloat16", "causal_count", True, True, True, "atomic"),
    ("bfloat16", "max_len", False, True, False, "separate"),
    ("float32", "causal_count", True, True, True, "stored"),
    ("float32", "max_len", False, False, False, "stored"),
    ("bfloat16", "max_len", False, True, True, "stored"),
]


def _check_backward(p, n, *, dtype, norm, mode, alpha=0.3, cot_seed=0, tol=None, **extra):
    rng = np.random.default_rng(cot_seed)
    cot = rng.standard_normal(p["q"].shape[:3] + (p["v"].shape[-1],)).astype(np.float32)
    diff = [name for name in ("q", "k", "v", "pos_bias", "time_bias") if p[name] is not None]

    f = kernel_fn(norm=norm, alpha=alpha, max_len=n, mode=mode, **extra)
    args = problem_args(p, dtype)
    idx = [ARRAY_KEYS.index(name) for name in diff]

    def loss(*xs):
        a = list(args)
        for i, x in zip(idx, xs):
            a[i] = x
        return jnp.sum(f(*a).astype(jnp.float32) * cot)

    inputs = [args[i] for i in idx]
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(diff)))))(*inputs)
    cast = {name: np.asarray(jnp.asarray(p[name]).astype(dtype).astype(jnp.float32)) for name in "qkv"}
    cot_seen = np.asarray(jnp.asarray(cot).astype(dtype).astype(jnp.float32))  # the kernel gets dO in dtype
    _, want = oracle(cast["q"], cast["k"], cast["v"], problem_terms(p, n), p["pos_bias"], p["time_bias"], alpha=alpha,
                     norm=norm, max_len=n, cotangent=cot_seen)
    want = dict(zip(("q", "k", "v", "pos_bias", "time_bias"), want))
    tol = tol or tolerance(dtype)
    for name, g in zip(diff, grads):
        assert g.shape == np.shape(p[name]) and g.dtype == inputs[diff.index(name)].dtype
        err = rel_err(g, want[name])
        assert err < tol, f"d{name}: relative error {err:.2e}"


@needs_interpreter
@pytest.mark.parametrize("dtype,norm,targets,pos,time,dq_mode", BACKWARD_CASES)
def test_interpreter_backward_matches_float64(dtype, norm, targets, pos, time, dq_mode):
    rng = np.random.default_rng(seed_of(dtype, norm, targets, pos, time, "bwd"))
    n = 37
    p = make_problem(rng, 3, n, 2, 16, 24, lengths=[n, 1, rng.integers(2, n)], targets=targets, pos=pos, time=time)
    _check_backward(p, n, dtype=dtype, norm=norm, mode="interpret", dq_mode=dq_mode)


@needs_interpreter
def test_interpreter_backward_many_targets_and_odd_dims():
    """Candidate blocks straddling the history boundary, candidates-only key blocks, odd D."""
    rng = np.random.default_rng(5)
    n = 45
    p = make_problem(rng, 2, n, 1, 12, 20, lengths=[45, 40], targets=False)
    p["num_targets"] = np.array([20, 33], np.int32)
    _check_backward(p, n, dtype="float32", norm="causal_count", mode="interpret")
    _check_backward(p, n, dtype="float32", norm="causal_count", mode="interpret", dq_mode="separate")
    _check_backward(p, n, dtype="float32", norm="causal_count", mode="interpret", dq_mode="stored")


STORED_BWD = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@needs_interpreter
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 110), b=st.integers(1, 3), targets=st.booleans(),
       bias=st.booleans(), dq_block=st.sampled_from([(16, 16), (32, 16), (16, 32), (32, 32)]))
def test_interpreter_stored_ds_backward_random_shapes(seed, n, b, targets, bias, dq_block):
    """dq_mode="stored": the dQ kernel reads back exactly the dS tiles the key-major kernel
    wrote (unwritten ones are NaN in the interpreter), for any length, several slabs, history
    and candidate blocks, and any dQ tile that divides the slab."""
    rng = np.random.default_rng(seed)
    p = make_problem(rng, b, n, 2, 16, 16, targets=targets, pos=bias, time=bias)
    dq_cfg = {"BLOCK_M": dq_block[0], "BLOCK_N": dq_block[1], "num_warps": 4, "num_stages": 1}
    _check_backward(p, n, dtype="float32", norm="causal_count", mode="interpret", dq_mode="stored",
                    bwd_config=STORED_BWD, dq_config=dq_cfg)


@needs_interpreter
def test_stored_ds_buffer_size_and_bad_dq_config():
    from genrec_jax.kernels import hstu_attention as ka

    # B=32, H=4, N=4096, slab 128: 32 x 33 / 2 tiles of 128 x 128 per (sequence, head), bf16
    assert ka.stored_ds_bytes(32, 4, 4096, 128) == 32 * 4 * 528 * 128 * 128 * 2
    assert ka.stored_ds_bytes(1, 1, 1, 16, itemsize=4) == 16 * 16 * 4
    rng = np.random.default_rng(3)
    p = make_problem(rng, 2, 20, 1, 16, 16, pos=False, time=False)
    with pytest.raises(ValueError, match="must divide"):
        _check_backward(p, 20, dtype="float32", norm="max_len", mode="interpret", dq_mode="stored",
                        bwd_config=STORED_BWD, dq_config={"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4,
                                                          "num_stages": 1})
    with pytest.raises(ValueError, match="dq_mode must be one of"):
        _check_backward(p, 20, dtype="float32", norm="max_len", mode="interpret", dq_mode="dense")


@needs_triton
def test_dq_mode_auto_stores_ds_for_long_sequences_within_the_memory_limit():
    from genrec_jax.kernels import hstu_attention as ka

    def auto(b, n, **kw):
        args = dict(batch=b, heads=4, max_seq_len=n, head_dim=128, rab=False, dtype=jnp.bfloat16, bwd_config=None,
                    mode="jax_triton")
        return ka._dq_mode("auto", **{**args, **kw})

    assert auto(32, ka.STORED_DS_MIN_LEN - 1) == "atomic"
    assert auto(32, 4096) == "stored"  # 2.2 GB of dS
    assert ka.stored_ds_bytes(32, 4, 8192, 128) > ka.STORED_DS_AUTO_MAX_BYTES
    assert auto(32, 8192) == "atomic"
    assert auto(8, 8192) == "stored"
    assert auto(32, 4096, dtype=jnp.float32) == "atomic"  # float32 dS: 4.43 GB, over 4 GiB
    assert auto(2, 2048, bwd_config={"BLOCK_M": 16, "BLOCK_N": 32}) == "stored"


CACHED_CASES = [
    # dtype, norm, hist, pos, time
    ("float32", "max_len", False, True, True),
    ("float32", "causal_count", True, True, True),
    ("float32", "causal_count", False, False, False),
    ("bfloat16", "causal_count", True, True, True),
]


@needs_interpreter
@pytest.mark.parametrize("dtype,norm,use_hist,pos,time", CACHED_CASES)
def test_interpreter_cached_matches_float64(dtype, norm, use_hist, pos, time):
    from genrec_jax.kernels.hstu_attention import hstu_attention_cached_triton
    from genrec_jax.ops.hstu_attention import hstu_attention_cached

    rng = np.random.default_rng(seed_of(dtype, norm, use_hist, pos, time, "cached"))
    b, m, c, h, dqk, dv = 3, 5, 40, 2, 16, 24
    hist = np.array([30, 1, 13], np.int32)
    kv_lengths = hist + m
    if use_hist:  # M-FALCON: the m candidates sit after the history
        q_positions = hist[:, None] + np.arange(m)[None, :]
    else:  # incremental prefill / decode: sorted positions, some beyond earlier ones
        q_positions = np.sort(rng.integers(0, kv_lengths[:, None], (b, m)), axis=1)
    q = rng.standard_normal((b, m, h, dqk)).astype(np.float32)
    kc = rng.standard_normal((b, c, h, dqk)).astype(np.float32)
    vc = rng.standard_normal((b, c, h, dv)).astype(np.float32)
    kts = np.cumsum(rng.integers(0, 5000, (b, c)), axis=1).astype(np.int32)
    qts = (np.take_along_axis(kts, q_positions, axis=1) + rng.integers(0, 100, (b, m))).astype(np.int32)
    pb = (rng.standard_normal(c + 1) * 0.5).astype(np.float32) if pos else None
    tb = (rng.standard_normal(16) * 0.5).astype(np.float32) if time else None
    kw = dict(alpha=0.3, max_len=c, norm=norm, hist_lengths=jnp.asarray(hist) if use_hist else None,
              pos_bias=_jnp(pb), time_bias=_jnp(tb), k_timestamps=jnp.asarray(kts) if time else None,
              q_timestamps=jnp.asarray(qts) if time else None)
    args = (jnp.asarray(q, dtype), jnp.asarray(kc, dtype), jnp.asarray(vc, dtype), jnp.asarray(q_positions),
            jnp.asarray(kv_lengths))
    got = hstu_attention_cached_triton(*args, launch_mode="interpret", **kw)
    cast = [np.asarray(x.astype(jnp.float32)) for x in args[:3]]
    terms = cached_attention_terms(q_positions, kv_lengths, c, hist if use_hist else None, kts if time else None, qts,
                                   1 if pb is None else len(pb), 1 if tb is None else len(tb))
    want = oracle(*cast, terms, pb, tb, alpha=0.3, norm=norm, max_len=c)
    assert got.shape == (b, m, h, dv) and got.dtype == jnp.dtype(dtype)
    err = rel_err(got, want)
    assert err < tolerance(dtype), f"relative error {err:.2e}"
    if dtype == "float32":  # and the XLA op (same contract) agrees
        xla = hstu_attention_cached(*args, backend="xla", **kw)
        assert rel_err(got, np.asarray(xla, np.float64)) < 1e-5


@needs_interpreter
def test_interpreter_under_jit():
    from genrec_jax.kernels.hstu_attention import hstu_attention_triton

    rng = np.random.default_rng(9)
    n = 20
    p = make_problem(rng, 2, n, 2, 16, 16, lengths=[20, 9], pos=True, time=False)
    f = jax.jit(lambda q, k, v, lens, pb: hstu_attention_triton(q, k, v, lens, alpha=0.2, max_len=n, pos_bias=pb,
                                                                 launch_mode="interpret"))
    got = f(*(jnp.asarray(p[x]) for x in ("q", "k", "v", "lengths", "pos_bias")))
    want = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], None, alpha=0.2, norm="max_len",
                  max_len=n)
    assert rel_err(got, want) < 1e-5


# --------------------------------------------------------------------------- static compile (no GPU)


@needs_triton
@pytest.mark.parametrize("kind", ["fwd", "bwd", "dq", "cached", "bwds", "dqs"])
def test_compiles_for_sm90_within_shared_memory(kind):
    """Every kernel compiles to sm_90 (wgmma) with all features on, bf16, D = 128, in the
    first autotune configuration, within the H100's 227 KB of shared memory per block."""
    from genrec_jax.kernels import hstu_attention as ka
    from genrec_jax.kernels import launch

    ptr = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "OUT": "*bf16", "DK": "*bf16", "DQ": "*fp32",
           "DPOS": "*fp32", "DTIME": "*fp32", "POS_BIAS": "*fp32", "TIME_BIAS": "*fp32"}
    flags = dict(H=4, DQK=128, NORM_COUNT=True, HAS_POS=True, HAS_TIME=True, PRECISION="tf32", BLOCK_DQK=128,
                 BLOCK_DV=128, SILU=ka._silu_mode("bfloat16", "jax_triton"), NC=ka._table_nc("jax_triton"))
    if kind == "fwd":
        kernel = ka.autotuned("fwd", 128, True)
        meta = dict(flags, DV=128, HAS_TARGETS=True, PADDED=True, GROUPED=True)
    elif kind in ("bwd", "bwds"):
        kernel = ka.autotuned(kind, 128, True)
        meta = dict(flags, DV_DIM=128, HAS_TARGETS=True, PADDED=True, BLOCK_NB=64, ATOMIC_DQ=kind == "bwd",
                    STORE_DS=kind == "bwds", GROUPED=True)
        ptr.update(DV="*bf16", DS="*bf16")
    elif kind == "dqs":
        kernel = ka.autotuned("dqs", 128, True, 64)
        meta = dict(H=4, DQK=128, HAS_TARGETS=True, PADDED=True, PRECISION="tf32", SLAB=64, BLOCK_DQK=128,
                    GROUPED=True)
        ptr.update(DQ="*bf16", DS="*bf16")
    elif kind == "dq":
        kernel = ka.autotuned("dq", 128, True)
        meta = dict(flags, DV=128, HAS_TARGETS=True, PADDED=True, GROUPED=True)
        ptr["DQ"] = "*bf16"
    else:
        kernel = ka.autotuned("cached", 16)
        meta = dict(flags, DV=128, HAS_HIST=True)
    cfg = launch.autotune_configs(kernel)[0]
    names = launch.base_jit(kernel).arg_names
    sig = {}
    for name in names:
        if name in meta or name in cfg:
            continue  # constexpr
        if name in ptr:
            sig[name] = ptr[name]
        elif name.isupper():  # lengths, offsets, positions, timestamps
            sig[name] = "*i32"
        elif name in ("alpha", "inv_max_len"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    compiled = launch.compile_for_target(
        kernel, sig, {**meta, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}},
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    assert compiled.metadata.shared <= 232448
    assert "mma" in compiled.asm["ptx"]
    if kind == "dqs":
        return  # one product per tile: no SiLU, no bias tables
    assert flags["SILU"] == 2 and "tanh.approx.f32" in compiled.asm["ptx"]  # one MUFU op per pair (bf16)
    # bias tables gathered by ld.global.nc (a tl.load would be pipelined into 4-byte cp.async)
    assert flags["NC"] == 1 and "ld.global.nc.f32" in compiled.asm["ptx"]


# --------------------------------------------------------------------------- GPU (jax-triton)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("targets", [False, True])
def test_gpu_forward_backward_match_float64(dtype, targets):
    rng = np.random.default_rng(21 + targets)
    n = 300
    p = make_problem(rng, 3, n, 2, 64, 64, lengths=[n, 1, 177], targets=targets)
    _check_forward(p, n, dtype=dtype, norm="causal_count", mode="jax_triton")
    _check_backward(p, n, dtype=dtype, norm="causal_count", mode="jax_triton")
    _check_backward(p, n, dtype=dtype, norm="causal_count", mode="jax_triton", dq_mode="separate")


@pytest.mark.gpu
@needs_gpu
def test_gpu_poisoned_outputs_all_written():
    """Native Triton launch on torch CUDA tensors with NaN-poisoned outputs."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(23)
    n = 200
    p = make_problem(rng, 3, n, 2, 64, 64, lengths=[n, 1, 77], targets=True)
    _check_forward(p, n, dtype="bfloat16", norm="max_len", mode="torch")
    _check_backward(p, n, dtype="bfloat16", norm="max_len", mode="torch")


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatch_uses_triton():
    from genrec_jax.ops.hstu_attention import hstu_attention, resolve_backend

    assert resolve_backend("auto") == "triton"
    rng = np.random.default_rng(25)
    n = 128
    p = make_problem(rng, 2, n, 2, 32, 32, lengths=[n, 50], targets=False, time=False)
    got = hstu_attention(*(jnp.asarray(p[x]) for x in ("q", "k", "v", "lengths")), max_len=n,
                         pos_bias=jnp.asarray(p["pos_bias"]), backend="triton")
    want = oracle(p["q"], p["k"], p["v"], problem_terms(p, n), p["pos_bias"], None, alpha=1 / math.sqrt(32),
                  norm="max_len", max_len=n)
    assert rel_err(got, want) < 1e-5


@needs_interpreter
def test_dispatch_passes_dq_mode_to_the_kernels(monkeypatch):
    """``hstu_attention(..., backend="triton", dq_mode=)`` (what ``model.attention_dq_mode``
    sets) reaches the kernels: "stored" gradients equal the reference's, and a bad mode is
    refused by name."""
    from genrec_jax.ops import hstu_attention as ops

    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setenv("GENREC_TRITON_LAUNCH", "interpret")
    rng = np.random.default_rng(29)
    b, n, h, d = 2, 40, 2, 16
    q, k, v, w = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(4))
    lengths = jnp.asarray([n, 23], jnp.int32)
    pos = jnp.asarray(rng.normal(size=(n + 1,)) * 0.3, jnp.float32)

    def grads(backend, dq_mode="atomic"):
        def f(q, k, v, pos):
            out = ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, backend=backend, dq_mode=dq_mode)
            return jnp.sum(out * w)
        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, pos)

    want = grads("xla")
    for name, g, r in zip(("q", "k", "v", "pos_bias"), grads("triton", "stored"), want):
        assert rel_err(g, r) < 1e-5, name
    with pytest.raises(ValueError, match="dq_mode must be one of"):
        grads("triton", "nope")

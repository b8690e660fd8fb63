"""HSTU attention reference: float64 NumPy agreement, causality, padding and cache exactness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st

import functools

from genrec_jax.ops import hstu_attention as ops
from genrec_jax.ops.hstu_attention import resolve_backend, time_bucket


def _jit(fn, static=("alpha", "max_len", "norm", "backend", "query_block")):
    """jit with the scalar options static: one compile per shape instead of slow op-by-op runs."""

    @functools.lru_cache(maxsize=None)
    def compiled(stat):
        return jax.jit(functools.partial(fn, **dict(stat)))

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        stat = tuple(sorted((k, kwargs.pop(k)) for k in list(kwargs) if k in static))
        return compiled(stat)(*args, **kwargs)

    return wrapped


hstu_attention = _jit(ops.hstu_attention)
hstu_attention_cached = _jit(ops.hstu_attention_cached)


def numpy_hstu(q, k, v, lengths, *, alpha, max_len, norm, num_targets=None, pos_bias=None, time_bias=None,
               ts=None, qts=None):
    """Straight loops in float64: the definition in the module docstring."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, h, _ = q.shape
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for r in range(b):
        L = int(lengths[r])
        hist = L - (int(num_targets[r]) if num_targets is not None else 0)
        pos = [min(i, hist) if num_targets is not None else i for i in range(n)]
        for i in range(L):
            keys = [j for j in range(L) if j <= i and (j < hist or j == i)]
            for hh in range(h):
                acc = np.zeros(v.shape[-1])
                for j in keys:
                    s = alpha * q[r, i, hh] @ k[r, j, hh]
                    if pos_bias is not None:
                        s += pos_bias[min(pos[i] - pos[j], len(pos_bias) - 1)]
                    if time_bias is not None:
                        dt = max(int(qts[r, i]) - int(ts[r, j]), 0)
                        bkt = min(int(math.floor(math.log2(1 + dt) * 2)), len(time_bias) - 1)
                        s += time_bias[bkt]
                    a = s / (1 + math.exp(-s))
                    a /= max_len if norm == "max_len" else len(keys)
                    acc += a * v[r, j, hh]
                out[r, i, hh] = acc
    return out


def random_inputs(rng, b, n, h, d, dv):
    q = rng.standard_normal((b, n, h, d)).astype(np.float32)
    k = rng.standard_normal((b, n, h, d)).astype(np.float32)
    v = rng.standard_normal((b, n, h, dv)).astype(np.float32)
    ts = np.cumsum(rng.integers(0, 5000, (b, n)), axis=1).astype(np.int32)
    qts = np.concatenate([ts[:, 1:], ts[:, -1:] + 7], axis=1).astype(np.int32)
    return q, k, v, ts, qts


@given(
    b=st.integers(1, 3), n=st.integers(1, 9), h=st.integers(1, 3), d=st.sampled_from([4, 8]),
    norm=st.sampled_from(["max_len", "causal_count"]), with_targets=st.booleans(), seed=st.integers(0, 10_000),
)
def test_reference_matches_float64_numpy(b, n, h, d, norm, with_targets, seed):
    rng = np.random.default_rng(seed)
    q, k, v, ts, qts = random_inputs(rng, b, n, h, d, d + 2)
    lengths = rng.integers(1, n + 1, b).astype(np.int32)
    targets = np.minimum(rng.integers(0, 3, b), lengths - 1).astype(np.int32) if with_targets else None
    pos_bias = rng.standard_normal(n + 1).astype(np.float32) * 0.5
    time_bias = rng.standard_normal(16).astype(np.float32) * 0.5
    got = hstu_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), alpha=0.3, max_len=n, norm=norm,
        num_targets=None if targets is None else jnp.asarray(targets), pos_bias=jnp.asarray(pos_bias),
        time_bias=jnp.asarray(time_bias), timestamps=jnp.asarray(ts), query_timestamps=jnp.asarray(qts),
        backend="xla",
    )
    want = numpy_hstu(q, k, v, lengths, alpha=0.3, max_len=n, norm=norm, num_targets=targets,
                      pos_bias=pos_bias, time_bias=time_bias, ts=ts, qts=qts)
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@given(n=st.integers(2, 12), cut=st.integers(1, 11), seed=st.integers(0, 10_000),
       norm=st.sampled_from(["max_len", "causal_count"]))
def test_causality_later_tokens_do_not_change_earlier_outputs(n, cut, seed, norm):
    cut = min(cut, n - 1)
    rng = np.random.default_rng(seed)
    q, k, v, ts, qts = random_inputs(rng, 2, n, 2, 8, 8)
    lengths = jnp.array([n, n])
    f = lambda q, k, v: hstu_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths,  # noqa: E731
                                       max_len=n, norm=norm, backend="xla")
    base = np.asarray(f(q, k, v))
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[:, cut:] = rng.standard_normal(q2[:, cut:].shape)
    k2[:, cut:] = rng.standard_normal(k2[:, cut:].shape)
    v2[:, cut:] = rng.standard_normal(v2[:, cut:].shape)
    changed = np.asarray(f(q2, k2, v2))
    np.testing.assert_allclose(changed[:, :cut], base[:, :cut], rtol=1e-6, atol=1e-7)
    assert not np.allclose(changed[:, cut:], base[:, cut:])


@given(seed=st.integers(0, 10_000), extra=st.integers(1, 7))
def test_padding_invariance(seed, extra):
    """Outputs on valid tokens do not depend on how much padding follows (or its values)."""
    rng = np.random.default_rng(seed)
    n = 6
    q, k, v, ts, qts = random_inputs(rng, 3, n + extra, 2, 4, 4)
    lengths = jnp.array([n, 3, 1])
    kw = dict(max_len=16, pos_bias=jnp.linspace(-1, 1, 17), time_bias=jnp.linspace(0, 1, 8), backend="xla")
    long = hstu_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths, timestamps=jnp.asarray(ts),
                          query_timestamps=jnp.asarray(qts), **kw)
    short = hstu_attention(jnp.asarray(q[:, :n]), jnp.asarray(k[:, :n]), jnp.asarray(v[:, :n]), lengths,
                           timestamps=jnp.asarray(ts[:, :n]), query_timestamps=jnp.asarray(qts[:, :n]), **kw)
    long, short = np.asarray(long), np.asarray(short)
    for r, L in enumerate([6, 3, 1]):
        np.testing.assert_allclose(long[r, :L], short[r, :L], rtol=1e-6, atol=1e-7)
        assert np.all(long[r, L:] == 0.0), "padding rows must be exactly zero"


def test_jagged_packed_rows_equal_separate_rows():
    """Each row computed alone (its own batch of one) equals the batched, padded result."""
    rng = np.random.default_rng(0)
    q, k, v, ts, qts = random_inputs(rng, 4, 10, 2, 8, 8)
    lengths = np.array([10, 7, 2, 5], np.int32)
    full = np.asarray(hstu_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                                     max_len=10, backend="xla"))
    for r, L in enumerate(lengths):
        one = hstu_attention(jnp.asarray(q[r:r + 1, :L]), jnp.asarray(k[r:r + 1, :L]), jnp.asarray(v[r:r + 1, :L]),
                             jnp.array([L]), max_len=10, backend="xla")
        np.testing.assert_allclose(np.asarray(one)[0], full[r, :L], rtol=1e-6, atol=1e-7)


@given(seed=st.integers(0, 10_000), hist=st.integers(1, 8), new=st.integers(1, 4),
       norm=st.sampled_from(["max_len", "causal_count"]))
def test_cached_equals_full_sequence(seed, hist, new, norm):
    rng = np.random.default_rng(seed)
    n = hist + new
    q, k, v, ts, qts = random_inputs(rng, 2, n, 2, 4, 6)
    kw = dict(max_len=12, norm=norm, pos_bias=jnp.asarray(rng.standard_normal(13), jnp.float32),
              time_bias=jnp.asarray(rng.standard_normal(12), jnp.float32), backend="xla")
    full = np.asarray(hstu_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.array([n, n]),
                                     timestamps=jnp.asarray(ts), query_timestamps=jnp.asarray(qts), **kw))
    cap = 16
    kc = np.zeros((2, cap, 2, 4), np.float32)
    vc = np.zeros((2, cap, 2, 6), np.float32)
    tsc = np.zeros((2, cap), np.int32)
    kc[:, :n], vc[:, :n], tsc[:, :n] = k, v, ts
    qpos = np.broadcast_to(np.arange(hist, n), (2, new))
    got = hstu_attention_cached(jnp.asarray(q[:, hist:]), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(qpos),
                                jnp.array([n, n]), k_timestamps=jnp.asarray(tsc),
                                q_timestamps=jnp.asarray(qts[:, hist:]), **kw)
    np.testing.assert_allclose(np.asarray(got), full[:, hist:], rtol=1e-5, atol=1e-6)


def test_mfalcon_candidates_see_history_and_themselves_only():
    rng = np.random.default_rng(1)
    hist, m = 5, 3
    q, k, v, ts, qts = random_inputs(rng, 1, hist + m, 1, 4, 4)
    kw = dict(max_len=8, backend="xla", pos_bias=jnp.linspace(0, 1, 9))
    full = np.asarray(hstu_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.array([hist + m]),
                                     num_targets=jnp.array([m]), **kw))
    # Each candidate scored alone after the history gives the same output.
    for c in range(m):
        idx = list(range(hist)) + [hist + c]
        alone = np.asarray(hstu_attention(jnp.asarray(q[:, idx]), jnp.asarray(k[:, idx]), jnp.asarray(v[:, idx]),
                                          jnp.array([hist + 1]), num_targets=jnp.array([1]), **kw))
        np.testing.assert_allclose(alone[0, hist], full[0, hist + c], rtol=1e-6, atol=1e-7)
    # Cached path: candidates against the history cache.
    kc, vc = k[:, :hist], v[:, :hist]
    k_all = np.concatenate([kc, k[:, hist:]], 1)
    v_all = np.concatenate([vc, v[:, hist:]], 1)
    got = hstu_attention_cached(jnp.asarray(q[:, hist:]), jnp.asarray(k_all), jnp.asarray(v_all),
                                jnp.array([[hist, hist + 1, hist + 2]]), jnp.array([hist + m]),
                                hist_lengths=jnp.array([hist]), **kw)
    np.testing.assert_allclose(np.asarray(got)[0], full[0, hist:], rtol=1e-6, atol=1e-7)


def test_time_bucket_is_monotone_and_bounded():
    dt = jnp.array([-5, 0, 1, 2, 10, 3600, 86400, 10**9])
    b = np.asarray(time_bucket(dt, 40))
    assert b[0] == 0 and b[1] == 0
    assert np.all(np.diff(b) >= 0) and b.max() <= 39


def test_backend_choice_on_cpu():
    assert resolve_backend("auto") == "xla"
    assert resolve_backend("xla") == "xla"
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(RuntimeError, match="jax-triton"):
            resolve_backend("triton")


@functools.partial(jax.jit, static_argnames=("n", "scatter_free"))
def _bias_loss_and_grads(pos_bias, time_bias, lengths, nt, ts, qts, w, *, n, scatter_free):
    def loss(p, t):
        if scatter_free:
            bias = ops.self_attention_bias(n, lengths, nt, p, qts, ts, t)
        else:
            pos = ops.token_positions(lengths, n, nt)
            bias = ops.relative_bias(pos, pos, p, qts, ts, t)
        return jnp.sum(bias * w)

    return jax.value_and_grad(loss, argnums=(0, 1))(pos_bias, time_bias)


@given(n=st.sampled_from([1, 2, 7, 16]), num_pos=st.sampled_from([1, 3, 9, 40]), with_targets=st.booleans(),
       seed=st.integers(0, 10_000))
def test_scatter_free_bias_equals_gathered_bias_and_its_gradient(n, num_pos, with_targets, seed):
    """The reference's bias (Toeplitz position part, compare-and-sum time gradient) is the
    gather over token positions, in value and in both tables' float64 gradients."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        b = 3
        lengths = jnp.asarray(rng.integers(1, n + 1, b), jnp.int32)
        nt = jnp.minimum(jnp.asarray(rng.integers(0, 4, b), jnp.int32), lengths) if with_targets else None
        args = (
            jnp.asarray(rng.normal(size=num_pos), jnp.float64),  # position table
            jnp.asarray(rng.normal(size=9), jnp.float64),  # time-bucket table
            lengths, nt,
            jnp.asarray(np.sort(rng.integers(0, 10**7, (b, n)), axis=1)),
        )
        qts = args[-1] + jnp.asarray(rng.integers(0, 10**5, (b, n)))
        w = jnp.asarray(rng.normal(size=(b, 1, n, n)), jnp.float64)
        v_ref, g_ref = _bias_loss_and_grads(*args, qts, w, n=n, scatter_free=False)
        v_new, g_new = _bias_loss_and_grads(*args, qts, w, n=n, scatter_free=True)
        np.testing.assert_allclose(v_new, v_ref, rtol=1e-12)
        for x, y in zip(g_new, g_ref):
            assert x.dtype == jnp.float64 and np.all(np.isfinite(x))
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_remat_recomputes_scores_with_equal_values_and_gradients(seed):
    """``remat=True`` (XLA path): same outputs and gradients (inputs and bias tables); the
    backward holds a rematerialised forward instead of kept scores."""
    rng = np.random.default_rng(seed)
    b, n, h, d = 2, 12, 2, 8
    q, k, v, ts, qts = (jnp.asarray(x) for x in random_inputs(rng, b, n, h, d, d))
    lengths = jnp.asarray([n, n // 2 + 1], jnp.int32)
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32))
    tb = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32))

    def loss(q, k, v, pos, tb, remat):
        out = ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, time_bias=tb, timestamps=ts,
                                 query_timestamps=qts, backend="xla", remat=remat)
        return jnp.sum(out * w)

    grads = {r: jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, pos, tb, r) for r in (False, True)}
    for a, c in zip(grads[False], grads[True]):
        assert np.all(np.isfinite(np.asarray(c)))
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(q, k, v, pos, tb, True), loss(q, k, v, pos, tb, False), rtol=1e-6)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=0), static_argnums=(5,))(q, k, v, pos, tb, True))
    assert "remat" in text or "checkpoint" in text, "the backward should recompute the forward"
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss, argnums=0), static_argnums=(5,))(q, k, v, pos, tb, False))


def test_table_lookup_gradient_with_indices_shared_between_lookups():
    """Two lookups of one index array (as every layer does with the time buckets): each
    table's gradient is its own compare-and-sum, equal to numpy's bincount."""
    rng = np.random.default_rng(4)
    idx = jnp.asarray(rng.integers(0, 9, (3, 5, 5)), jnp.int32)
    w1, w2 = (jnp.asarray(rng.standard_normal((3, 5, 5)), jnp.float32) for _ in range(2))
    t1, t2 = (jnp.asarray(rng.standard_normal(9), jnp.float32) for _ in range(2))

    def loss(t1, t2):
        return jnp.sum(jnp.sin(ops.table_lookup(t1, idx)) * w1) + jnp.sum(ops.table_lookup(t2, idx) ** 2 * w2)

    g1, g2 = jax.jit(jax.grad(loss, argnums=(0, 1)))(t1, t2)
    i = np.asarray(idx).ravel()
    want1 = np.bincount(i, (np.cos(np.asarray(t1)[i]) * np.asarray(w1).ravel()).astype(np.float64), minlength=9)
    want2 = np.bincount(i, (2 * np.asarray(t2)[i] * np.asarray(w2).ravel()).astype(np.float64), minlength=9)
    np.testing.assert_allclose(g1, want1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2, want2, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- query blocks (XLA path)


@given(
    b=st.integers(1, 3), n=st.integers(2, 14), block=st.integers(1, 8), h=st.integers(1, 2),
    norm=st.sampled_from(["max_len", "causal_count"]), with_targets=st.booleans(), with_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_query_blocks_match_float64_numpy(b, n, block, h, norm, with_targets, with_bias, seed):
    """Blocks of queries against the keys up to each block's end: the same attention as the
    definition, for every block size (uneven last blocks, blocks of 1, ragged lengths)."""
    rng = np.random.default_rng(seed)
    q, k, v, ts, qts = random_inputs(rng, b, n, h, 4, 6)
    lengths = rng.integers(1, n + 1, b).astype(np.int32)
    targets = np.minimum(rng.integers(0, 3, b), lengths - 1).astype(np.int32) if with_targets else None
    pos_bias = rng.standard_normal(n + 1).astype(np.float32) * 0.5 if with_bias else None
    time_bias = rng.standard_normal(16).astype(np.float32) * 0.5 if with_bias else None
    got = hstu_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), alpha=0.3, max_len=n, norm=norm,
        num_targets=None if targets is None else jnp.asarray(targets),
        pos_bias=None if pos_bias is None else jnp.asarray(pos_bias),
        time_bias=None if time_bias is None else jnp.asarray(time_bias),
        timestamps=jnp.asarray(ts) if with_bias else None, query_timestamps=jnp.asarray(qts) if with_bias else None,
        backend="xla", query_block=block,
    )
    want = numpy_hstu(q, k, v, lengths, alpha=0.3, max_len=n, norm=norm, num_targets=targets,
                      pos_bias=pos_bias, time_bias=time_bias, ts=ts, qts=qts)
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block,with_targets,remat,norm,bias", [
    (4, False, False, "causal_count", "pos+time"), (5, True, False, "causal_count", "pos+time"),
    (3, True, True, "causal_count", "pos+time"), (4, False, False, "max_len", "pos"),
    (5, True, False, "max_len", "none"), (6, False, False, "causal_count", "time"),
])
def test_query_blocks_gradients_equal_dense(block, with_targets, remat, norm, bias):
    """Gradients w.r.t. q, k, v and the bias tables equal the dense form's (float32, 1e-5),
    with either bias, both or none."""
    rng = np.random.default_rng(block)
    b, n, h, d = 3, 13, 2, 8
    q, k, v, ts, qts = (jnp.asarray(x) for x in random_inputs(rng, b, n, h, d, d))
    lengths = jnp.asarray([n, 7, 1], jnp.int32)
    nt = jnp.asarray([3, 2, 0], jnp.int32) if with_targets else None
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32))
    tb = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32))

    def loss(q, k, v, pos, tb, qb):
        out = ops.hstu_attention(q, k, v, lengths, max_len=n, norm=norm, num_targets=nt,
                                 pos_bias=pos if "pos" in bias else None, time_bias=tb if "time" in bias else None,
                                 timestamps=ts, query_timestamps=qts, backend="xla", remat=remat, query_block=qb)
        return jnp.sum(out * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5,))
    dense, blocked = grad(q, k, v, pos, tb, 0), grad(q, k, v, pos, tb, block)
    names = ("q", "k", "v", "pos_bias", "time_bias")
    used = {"q", "k", "v"} | {name for name in names[3:] if name.split("_")[0] in bias}
    for name, a, c in zip(names, dense, blocked):
        c = np.asarray(c)
        assert np.all(np.isfinite(c)), name
        a = np.asarray(a)  # bias-table entries are long sums: tolerance against the largest one
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * np.max(np.abs(a)) + 1e-6, err_msg=name)
        assert np.any(a != 0) == (name in used), name  # not a comparison between zeros


@settings(max_examples=12, deadline=None, phases=[Phase.generate])
@given(n=st.integers(2, 40), block=st.integers(1, 16), with_targets=st.booleans(), seed=st.integers(0, 10_000))
def test_query_blocks_bfloat16_gradients_near_float32(n, block, with_targets, seed):
    """In bfloat16 the blocked form's gradients of q, k, v and the position table stay within
    3% (of each tensor's largest entry) of the float32 dense reference's on the same inputs,
    for any lengths, block size and targets. A time-bias entry sums dS over every pair in its
    bucket, with cancellation, so its bfloat16 error has no bound relative to the result; it
    is compared with the dense form's in bfloat16 instead, where blocking changes only the
    order of float32 sums."""
    rng = np.random.default_rng(seed)
    b, h, d = 2, 2, 16
    q, k, v, ts, qts = (jnp.asarray(x) for x in random_inputs(rng, b, n, h, d, d))
    lengths = jnp.asarray([n, int(rng.integers(1, n + 1))], jnp.int32)
    nt = jnp.asarray([min(2, n), 0], jnp.int32) if with_targets else None
    pos = jnp.asarray(rng.standard_normal(n + 1).astype(np.float32))
    tb = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32))

    def loss(q, k, v, pos, tb, qb):
        out = ops.hstu_attention(q, k, v, lengths, max_len=n, norm="causal_count", num_targets=nt, pos_bias=pos,
                                 time_bias=tb, timestamps=ts, query_timestamps=qts, backend="xla", query_block=qb)
        return jnp.sum(out.astype(jnp.float32) * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5,))
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    want = grad(*(x.astype(jnp.float32) for x in bf), pos, tb, 0)  # float32 on the same (rounded) inputs
    dense_bf16 = grad(*bf, pos, tb, 0)
    got = grad(*bf, pos, tb, block)
    for name, a, a16, c in zip(("q", "k", "v", "pos_bias", "time_bias"), want, dense_bf16, got):
        a, a16, c = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, a16, c))
        assert np.all(np.isfinite(c)), name
        if name == "time_bias":
            np.testing.assert_allclose(c, a16, atol=1e-4 * np.max(np.abs(a16)) + 1e-6, rtol=0, err_msg=name)
        else:
            np.testing.assert_allclose(c, a, atol=0.03 * np.max(np.abs(a)) + 1e-6, rtol=0, err_msg=name)


def test_query_blocks_never_build_a_full_score_matrix():
    """With blocks, no intermediate of the forward or backward has the [N, N] score shape,
    and the score elements computed are (C + 1) / (2 C) of the dense form's."""
    b, n, h, d, block = 2, 64, 2, 6, 16  # d differs from every score dimension
    rng = np.random.default_rng(0)
    q, k, v, ts, qts = (jnp.asarray(x) for x in random_inputs(rng, b, n, h, d, d))
    lengths = jnp.asarray([n, 40], jnp.int32)
    pos, tb = jnp.zeros((n + 1,)), jnp.zeros((16,))

    def loss(q, k, v, pos, tb, qb):
        return jnp.sum(ops.hstu_attention(q, k, v, lengths, max_len=n, pos_bias=pos, time_bias=tb, timestamps=ts,
                                          query_timestamps=qts, backend="xla", query_block=qb))

    def score_elements(qb):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=(5,))(q, k, v, pos, tb, qb)
        shapes = [var.aval.shape for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"
                  for var in eqn.outvars]
        scores = [s for s in shapes if len(s) == 4 and s[:2] == (b, h) and d not in s[2:]]  # [B, H, q, k]
        return scores, sum(int(np.prod(s)) for s in scores)

    dense_shapes, dense = score_elements(0)
    blocked_shapes, blocked = score_elements(block)
    assert (b, h, n, n) in dense_shapes
    assert all(s[2] <= block and s[3] <= n for s in blocked_shapes), blocked_shapes
    c = n // block
    assert blocked * 2 * c == dense * (c + 1)

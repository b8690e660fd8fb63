"""Sampled softmax against the plain softmax over [positive, negatives] in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.train.losses import NEG_INF, low_precision_logits, sample_negatives, sampled_softmax_loss


def _reference(u, table, targets, mask, scale, log_q, neg):
    """-log softmax over the concatenation [positive, K negatives] (the direct form), float64."""
    u = np.asarray(u, np.float64)
    table = np.asarray(table, np.float64)
    log_q = np.asarray(log_q, np.float64)
    k = len(neg)
    pos = np.sum(u * table[targets], -1) * scale - (np.log(k) + log_q[targets])
    negl = np.einsum("bnd,kd->bnk", u, table[neg]) * scale - (np.log(k) + log_q[neg])
    negl = np.where(neg[None, None, :] == targets[..., None], NEG_INF, negl)
    logits = np.concatenate([pos[..., None], negl], -1)
    m = logits.max(-1, keepdims=True)
    ce = -(logits[..., 0] - (m[..., 0] + np.log(np.exp(logits - m).sum(-1))))
    w = np.asarray(mask, np.float64)
    return float((ce * w).sum() / max(w.sum(), 1.0))


def _random_inputs(rng, b, n, d, v):
    """User vectors [B, N, D], an item table [V, D], targets in 1..V-1, a validity mask."""
    u = jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, v, (b, n)), jnp.int32)
    mask = jnp.asarray(rng.random((b, n)) > 0.2)
    return u, table, targets, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_softmax_equals_the_concatenated_softmax(seed):
    rng = np.random.default_rng(seed)
    b, n, d, v, k = 3, 7, 16, 50, 32
    u, table, targets, mask = _random_inputs(rng, b, n, d, v)
    counts = rng.integers(0, 100, v)
    w = (counts + 1.0) ** 0.75
    w[0] = 0.0
    log_q = jnp.asarray(np.log(w / w.sum()), jnp.float32)
    key = jax.random.PRNGKey(seed)
    neg = np.asarray(sample_negatives(key, log_q, k))  # the draw the loss makes
    # make some negatives collide with targets (they must be masked out)
    targets = targets.at[0, :3].set(int(neg[0]))
    loss, _ = sampled_softmax_loss(u, table, targets, mask, 0.7, log_q, k, key)
    want = _reference(u, table, np.asarray(targets), mask, 0.7, log_q, neg)
    assert np.isfinite(float(loss))
    assert abs(float(loss) - want) <= 1e-5 * max(1.0, abs(want))

    # gradient w.r.t. the user vectors against a float64 finite difference of the reference
    g = jax.grad(lambda x: sampled_softmax_loss(x, table, targets, mask, 0.7, log_q, k, key)[0])(u)
    assert np.all(np.isfinite(np.asarray(g)))
    idx = (1, 2, 3)
    eps = 1e-4
    up = np.asarray(u, np.float64).copy()
    up[idx] += eps
    dn = np.asarray(u, np.float64).copy()
    dn[idx] -= eps
    fd = (_reference(up, table, np.asarray(targets), mask, 0.7, log_q, neg)
          - _reference(dn, table, np.asarray(targets), mask, 0.7, log_q, neg)) / (2 * eps)
    assert abs(float(g[idx]) - fd) <= 1e-3 * max(1.0, abs(fd))


@pytest.mark.parametrize("seed", [0, 1])
def test_negatives_follow_the_sampling_distribution(seed):
    """Frequencies of 400k draws match q within 5 standard errors per item; items of zero
    probability (the padding row, and a few more) are never drawn; q need not sum to 1."""
    rng = np.random.default_rng(seed)
    v, n = 40, 400_000
    w = rng.random(v) ** 3 + 0.01
    w[[0, 7, 31]] = 0.0
    q = w / w.sum()
    with np.errstate(divide="ignore"):
        log_w = np.log(w * 3.0)
    draws = np.asarray(sample_negatives(jax.random.key(seed), jnp.asarray(log_w, jnp.float32), n))
    assert draws.min() >= 0 and draws.max() < v
    freq = np.bincount(draws, minlength=v) / n
    assert freq[[0, 7, 31]].sum() == 0
    se = np.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(freq - q) <= 5 * se + 1e-6), np.max(np.abs(freq - q) / (se + 1e-12))


@pytest.mark.parametrize("seed", [0, 1])
def test_gathered_then_normalised_rows_equal_the_normalised_table(seed):
    """The train step hands the loss a row function (``model.item_vectors``: gather, then
    L2-normalise) instead of the normalised table: same loss and same gradient with respect
    to the raw embedding table (float32, 1e-5)."""
    from genrec_jax.model.recommender import l2_normalize

    rng = np.random.default_rng(seed)
    b, n, d, v, k = 2, 5, 8, 30, 16
    u, emb, targets, mask = _random_inputs(rng, b, n, d, v)
    log_q = jnp.log(jnp.asarray(np.r_[0.0, rng.random(v - 1) + 0.1], jnp.float32))
    key = jax.random.key(seed)

    def whole(e):
        return sampled_softmax_loss(u, l2_normalize(e), targets, mask, 0.5, log_q, k, key)[0]

    def rows(e):
        return sampled_softmax_loss(u, lambda ids: l2_normalize(jnp.take(e, ids, axis=0)), targets, mask, 0.5,
                                    log_q, k, key)[0]

    (l0, g0), (l1, g1) = jax.value_and_grad(whole)(emb), jax.value_and_grad(rows)(emb)
    assert np.isfinite(float(l0)) and np.all(np.isfinite(np.asarray(g1)))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g1)).max() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_logits_against_float64(seed):
    """bfloat16 operands, float32 accumulation: the product and both gradients stay within
    bfloat16 rounding of the float64 values, come back in the inputs' dtypes, and every
    product in the forward and backward takes bfloat16 operands."""
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((33, 64)), jnp.bfloat16)
    w = rng.standard_normal((2, 5, 33))  # a fixed linear function of the logits
    f = lambda a, b: jnp.sum(low_precision_logits(a, b, jnp.dtype(jnp.bfloat16)) * jnp.asarray(w, jnp.float32))
    out = low_precision_logits(u, v, jnp.dtype(jnp.bfloat16))
    du, dv = jax.grad(f, argnums=(0, 1))(u, v)
    u64, v64 = np.asarray(u, np.float64), np.asarray(v.astype(jnp.float32), np.float64)
    want = np.einsum("bnd,kd->bnk", u64, v64)
    want_du = np.einsum("bnk,kd->bnd", w, v64)
    want_dv = np.einsum("bnk,bnd->kd", w, u64)
    assert out.dtype == jnp.float32 and du.dtype == jnp.float32 and dv.dtype == jnp.bfloat16
    for got, ref in ((out, want), (du, want_du), (dv, want_dv)):
        got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
        assert np.all(np.isfinite(got))
        scale = np.sqrt(np.mean(ref**2))  # errors relative to the typical magnitude
        assert np.max(np.abs(got - ref)) <= 2e-2 * scale, np.max(np.abs(got - ref)) / scale
    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(u, v).jaxpr)
    assert len(dots) == 3, dots  # the forward product and the two gradient products
    assert all(dt == jnp.bfloat16 for pair in dots for dt in pair), dots


def _dot_operand_dtypes(jaxpr) -> list:
    """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(a.aval.dtype for a in eqn.invars))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_operand_dtypes(inner)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_softmax_bfloat16_logits_match_float32(seed):
    """logits_dtype=bfloat16 changes the loss and its gradient by bfloat16 rounding only."""
    rng = np.random.default_rng(seed)
    b, n, d, v, k = 2, 9, 32, 80, 64
    u, table, targets, mask = _random_inputs(rng, b, n, d, v)
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)  # unit vectors, as the model feeds it
    table = table / jnp.linalg.norm(table, axis=-1, keepdims=True)
    w = np.ones(v)
    w[0] = 0.0
    log_q = jnp.asarray(np.log(w / w.sum()), jnp.float32)
    key = jax.random.PRNGKey(seed)
    neg = np.asarray(sample_negatives(key, log_q, k))

    def loss(x, dt):
        return sampled_softmax_loss(x, table, targets, mask, 5.0, log_q, k, key, logits_dtype=dt)[0]

    want = _reference(u, table, np.asarray(targets), mask, 5.0, log_q, neg)
    got32, g32 = jax.value_and_grad(loss)(u, jnp.float32)
    got16, g16 = jax.value_and_grad(loss)(u, jnp.bfloat16)
    assert abs(float(got32) - want) <= 1e-5 * max(1.0, abs(want))
    assert np.isfinite(float(got16)) and abs(float(got16) - want) <= 1e-2 * max(1.0, abs(want))
    g32, g16 = np.asarray(g32, np.float64), np.asarray(g16, np.float64)
    assert np.all(np.isfinite(g16))
    assert np.max(np.abs(g16 - g32)) <= 2e-2 * np.max(np.abs(g32))
    assert not np.array_equal(g16, g32)  # the bfloat16 path really ran

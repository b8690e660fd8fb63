"""Sampled softmax against the plain softmax over [positive, negatives] in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genrec_jax.train.losses import NEG_INF, sample_negatives, sampled_softmax_loss


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

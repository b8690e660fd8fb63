"""Repeat-aware decoding (model.decoder.history_bias): the learnt per-level offset on codes
that continue into a history item -- its masks, beam search with it, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.config import DecoderConfig
from genrec_jax.semantic_ids.beam_search import beam_search, score_all_items
from genrec_jax.semantic_ids.decoder import (REPEAT_BIAS_SCALE, SemanticIDDecoder, decoder_loss,
                                             history_prefix_masks, prefix_sizes)
from genrec_jax.semantic_ids.trie import Trie

from .conftest import random_unique_codes

SIZES = (4, 3, 2)
NUM_ITEMS = 14


def brute_force_masks(hcodes, visible, codes, sizes, marks=None):
    b, g, n = visible.shape
    out = [np.zeros((b, g, k), bool) for k in sizes]
    for i in range(b):
        for p in range(g):
            for j in range(n):
                if not visible[i, p, j]:
                    continue
                for t in range(len(sizes)):
                    if (hcodes[i, j, :t] == codes[i, p, :t]).all() and (marks is None or marks[i, j, t]):
                        out[t][i, p, hcodes[i, j, t]] = True
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 7), g=st.integers(1, 4), with_marks=st.booleans())
def test_history_prefix_masks_equal_brute_force(seed, n, g, with_marks):
    rng = np.random.default_rng(seed)
    b = 2
    hcodes = np.stack([rng.integers(0, k, (b, n)) for k in SIZES], -1)
    codes = np.stack([rng.integers(0, k, (b, g)) for k in SIZES], -1)
    codes[:, 0] = hcodes[:, 0]  # some rows share long prefixes with the history
    visible = rng.random((b, g, n)) < 0.7
    marks = rng.random((b, n, len(SIZES))) < 0.5 if with_marks else None
    got = history_prefix_masks(jnp.asarray(hcodes), jnp.asarray(visible), jnp.asarray(codes), SIZES,
                               marks=None if marks is None else jnp.asarray(marks))
    want = brute_force_masks(hcodes, visible, codes, SIZES, marks)
    for t in range(len(SIZES)):
        np.testing.assert_array_equal(np.asarray(got[t]), want[t], err_msg=f"level {t}")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30))
def test_prefix_sizes_count_items_sharing_each_prefix(seed, n):
    """JAX (training, beam search) and NumPy (export driver) versions against a brute count."""
    from genrec_jax.export.ort_client import prefix_sizes as prefix_sizes_np

    rng = np.random.default_rng(seed)
    table = np.concatenate([np.zeros((1, 3), np.int32), np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n),
                                                                 rng.integers(0, 4, n)], 1)]).astype(np.int32)
    want = np.zeros_like(table)
    for i in range(1, n + 1):
        for t in range(3):
            want[i, t] = sum((table[j, :t + 1] == table[i, :t + 1]).all() for j in range(1, n + 1))
    np.testing.assert_array_equal(np.asarray(prefix_sizes(jnp.asarray(table))), want)
    np.testing.assert_array_equal(prefix_sizes_np(table), want)


@pytest.fixture(scope="module", params=["item", "prefix"])
def setup(request):
    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, dropout=0.0,
                        history_bias=True, history_bias_mode=request.param)
    dec = SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0))
    for head in dec.heads:
        head.kernel[...] = head.kernel[...] * 8.0
    dec.repeat_bias[...] = jnp.array([0.8, -1.5, -3.0]) / REPEAT_BIAS_SCALE
    table = random_unique_codes(np.random.default_rng(1), NUM_ITEMS, SIZES)
    # 14 items over 12 two-level prefixes: some paths become unique only at the last level
    assert len({tuple(r) for r in table[1:, :2]}) < NUM_ITEMS
    trie = Trie.from_item_codes(table, SIZES)
    graphdef, state = nnx.split(dec)
    states = jax.random.normal(jax.random.key(2), (3, 5, 8))
    lengths = jnp.array([5, 3, 1])
    hist = jnp.array([[3, 7, 7, 11, 0], [1, 2, 0, 0, 0], [0, 0, 0, 0, 0]])  # row 2: no history

    @jax.jit
    def search(state, bias):
        d = nnx.merge(graphdef, state)
        d.repeat_bias[...] = bias / REPEAT_BIAS_SCALE
        history = (d.add_repeat_bias, jnp.take(jnp.asarray(table), hist, axis=0), hist > 0,
                   d.history_marks(jnp.asarray(table), hist))
        return beam_search(d.prefill, d.decode_step, d.init_cache, trie, states, lengths, beam_width=NUM_ITEMS,
                           k=6, history=history)

    @jax.jit
    def exhaustive(state, bias):
        d = nnx.merge(graphdef, state)
        d.repeat_bias[...] = bias / REPEAT_BIAS_SCALE
        return score_all_items(d, jnp.asarray(table), states, lengths, history_items=hist)

    return state, search, exhaustive, np.asarray(hist)


@pytest.mark.parametrize("bias", [(0.8, -1.5, -3.0), (0.0, 0.0, 0.0), (-0.5, 2.0, 4.0)])
def test_beam_search_with_repeat_bias_equals_exhaustive_search(setup, bias):
    state, search, exhaustive, _ = setup
    bias = jnp.array(bias)
    ref = np.asarray(exhaustive(state, bias))
    assert np.isfinite(ref[:, 1:]).all()
    items, scores = map(np.asarray, search(state, bias))
    for b in range(3):
        want = np.argsort(-ref[b], kind="stable")[:6]
        np.testing.assert_array_equal(items[b], want)
        np.testing.assert_allclose(scores[b], ref[b, want], rtol=1e-4, atol=1e-4)


def test_a_strong_negative_offset_keeps_history_items_out_and_changes_nothing_else(setup):
    state, search, exhaustive, hist = setup
    zero = np.asarray(exhaustive(state, jnp.zeros(3)))
    items, _ = map(np.asarray, search(state, jnp.array([0.0, 0.0, -50.0])))
    for b in range(3):
        seen = set(hist[b][hist[b] > 0].tolist())
        assert not seen & set(items[b].tolist()), "a history item survived a -50 offset"
        # the rest keep their order: the unbiased ranking with the history items removed
        order = [i for i in np.argsort(-zero[b], kind="stable") if i > 0 and i not in seen][:6]
        assert items[b].tolist() == order
    assert items[2].tolist() == np.argsort(-zero[2], kind="stable")[:6].tolist()  # no history: no change


@pytest.mark.parametrize("train_mode", ["joint", "detached"])
def test_repeat_bias_learns_that_users_do_not_repeat(train_mode):
    """Planted data where the next item is drawn among the items not yet seen: trained with
    the cross entropy alone, the last level's offset goes strongly negative (measured -3.7
    after 300 steps, joint), the seen items' probability falls, and the targets are fitted
    better than without the offset. Detached, every other weight ends exactly where the run
    without the option ends."""
    v, n, b, d = 12, 6, 32, 16
    rng = np.random.default_rng(0)
    codes = np.stack(np.unravel_index(rng.permutation(np.prod(SIZES))[:v], SIZES), -1)
    item_codes = jnp.asarray(np.concatenate([np.zeros((1, 3), int), codes]), jnp.int32)
    item_vecs = jnp.asarray(rng.normal(size=(v + 1, d)), jnp.float32)

    def batch(seed):
        r = np.random.default_rng(seed)
        seqs = np.stack([r.permutation(np.arange(1, v + 1))[:n + 1] for _ in range(b)])
        items, targets = seqs[:, :n], seqs[:, 1:]
        return jnp.asarray(items), jnp.asarray(targets), jnp.cumsum(item_vecs[items], axis=1)

    lengths = jnp.full((b,), n)

    def train(history_bias):
        cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=32, dropout=0.0,
                            history_bias=history_bias, history_bias_train=train_mode)
        gd, params = nnx.split(SemanticIDDecoder(d, SIZES, cfg, rngs=nnx.Rngs(0)))
        tx = optax.adam(3e-3)
        opt = tx.init(params)

        def loss_fn(p, items, targets, states, key):
            return decoder_loss(nnx.merge(gd, p), item_codes, states, lengths, targets, key, 0, items=items)

        @jax.jit
        def step(p, opt, items, targets, states, key):
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, items, targets, states, key)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt

        for i in range(300):
            params, opt = step(params, opt, *batch(i), jax.random.key(i))
        ce, m = jax.jit(loss_fn)(params, *batch(10_000), jax.random.key(10_000))
        dec = nnx.merge(gd, params)
        # probability the trained decoder gives the history items, teacher-forced
        items, _, states = batch(10_001)
        hist_tgt = items[:, :n]  # every seen item, as if it were the next one
        cross = dec.prefill(states, lengths)
        hc = jnp.take(item_codes, hist_tgt, axis=0)
        mem = jnp.broadcast_to(jnp.arange(n)[None, None, :] <= n - 1, (b, n, n))
        history = (hc, mem, dec.history_marks(item_codes, hist_tgt)) if history_bias else None
        logits, _ = dec(hc, cross, mem, history=history)
        logp = sum(jnp.take_along_axis(jax.nn.log_softmax(lg, -1), hc[..., t:t + 1], -1)[..., 0]
                   for t, lg in enumerate(logits))
        return float(ce), float(jnp.exp(logp).mean()), m, params

    ce0, p0, _, w0 = train(False)
    ce1, p1, m1, w1 = train(True)
    assert np.isfinite([ce0, ce1, p0, p1]).all()
    assert float(m1["decoder_repeat_bias_2"]) < -2.0, m1
    assert p1 < 0.7 * p0, (p0, p1)  # measured 0.024 vs 0.043 (the memory alone already tells some)
    assert ce1 < ce0, (ce0, ce1)
    if train_mode == "detached":
        f0, f1 = dict(nnx.to_flat_state(w0)), dict(nnx.to_flat_state(w1))
        assert set(f1) - set(f0) == {("repeat_bias",)}
        for k, v in f0.items():
            np.testing.assert_allclose(np.asarray(f1[k][...]), np.asarray(v[...]), rtol=1e-5, atol=1e-6,
                                       err_msg=str(k))


def test_detached_offsets_take_the_offset_loss_value_and_the_plain_gradients():
    """history_bias_train="detached": the loss value is the offset model's cross entropy
    (as joint training reports it), every weight but the offsets gets the gradient of the
    decoder without the option, and the offsets get the joint gradient (they see the same
    logits)."""
    base = dict(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, dropout=0.0)
    item_codes = jnp.asarray(random_unique_codes(np.random.default_rng(5), NUM_ITEMS, SIZES))
    items = jnp.array([[1, 2, 3, 4, 5], [5, 6, 7, 0, 0], [8, 8, 9, 10, 2]])
    targets = jnp.array([[2, 3, 4, 1, 7], [6, 9, 5, 0, 0], [9, 10, 8, 2, 11]])
    lengths = jnp.array([5, 3, 5])
    states = jax.random.normal(jax.random.key(0), (3, 5, 8))

    def grads(**kw):
        dec = SemanticIDDecoder(8, SIZES, DecoderConfig(**base, **kw), rngs=nnx.Rngs(2))
        if dec.repeat_bias is not None:
            dec.repeat_bias[...] = jnp.array([-0.3, 0.2, -0.5])
        gd, params = nnx.split(dec)

        def loss(p):
            return decoder_loss(nnx.merge(gd, p), item_codes, states, lengths, targets, jax.random.key(1), 0,
                                items=items)[0]

        return jax.value_and_grad(loss)(params)

    (v_plain, g_plain), (v_joint, g_joint), (v_det, g_det) = (
        grads(), grads(history_bias=True), grads(history_bias=True, history_bias_train="detached"))
    assert np.isfinite([v_plain, v_joint, v_det]).all()
    np.testing.assert_allclose(float(v_det), float(v_joint), rtol=1e-6)
    assert abs(float(v_det) - float(v_plain)) > 1e-3  # the offsets act on this batch
    np.testing.assert_allclose(np.asarray(g_det["repeat_bias"][...]), np.asarray(g_joint["repeat_bias"][...]),
                               rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g_det["repeat_bias"][...])).max() > 0
    fp, fd, fj = (dict(nnx.to_flat_state(g)) for g in (g_plain, g_det, g_joint))
    differs = False
    for k, v in fp.items():
        np.testing.assert_allclose(np.asarray(fd[k][...]), np.asarray(v[...]), rtol=1e-5, atol=1e-7, err_msg=str(k))
        differs |= not np.allclose(np.asarray(fj[k][...]), np.asarray(v[...]), rtol=1e-3, atol=1e-6)
    assert differs  # joint training does change the other gradients (so the test can tell them apart)


def test_search_without_history_is_refused_for_a_repeat_aware_decoder(setup):
    from genrec_jax.semantic_ids.beam_search import decoder_beam_search

    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, history_bias=True)
    dec = SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0))
    trie = Trie.from_item_codes(random_unique_codes(np.random.default_rng(1), NUM_ITEMS, SIZES), SIZES)
    with pytest.raises(ValueError, match="history_bias"):
        decoder_beam_search(dec, trie, jnp.zeros((1, 2, 8)), jnp.array([2]), beam_width=4, k=2)


def test_the_option_leaves_the_other_weights_initialisation_unchanged():
    """Same seed with and without history_bias: every other weight is identical (so runs
    with and without the option compare like for like)."""
    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16)
    a = nnx.state(SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(3)), nnx.Param)
    b = nnx.state(SemanticIDDecoder(8, SIZES, DecoderConfig(**{**cfg.__dict__, "history_bias": True}),
                                    rngs=nnx.Rngs(3)), nnx.Param)
    fa, fb = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
    assert set(fb) - set(fa) == {("repeat_bias",)}
    for k, v in fa.items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(fb[k][...]), err_msg=str(k))


def test_history_bias_levels_keeps_the_offset_to_the_last_levels():
    """history_bias_levels=1: only the last level's offset acts; the earlier ones are 0 in
    the logits and get no gradient."""
    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, dropout=0.0,
                        history_bias=True, history_bias_levels=1)
    dec = SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0))
    dec.repeat_bias[...] = jnp.array([1.0, 2.0, -3.0]) / REPEAT_BIAS_SCALE
    np.testing.assert_allclose(np.asarray(dec.repeat_offsets()), [0.0, 0.0, -3.0], rtol=1e-6)
    item_codes = jnp.asarray(random_unique_codes(np.random.default_rng(5), NUM_ITEMS, SIZES))
    items = jnp.array([[1, 2, 3, 4], [5, 6, 0, 0]])
    targets = jnp.array([[2, 3, 4, 7], [6, 9, 0, 0]])
    states = jax.random.normal(jax.random.key(0), (2, 4, 8))
    gd, params = nnx.split(dec)

    def loss(p):
        return decoder_loss(nnx.merge(gd, p), item_codes, states, jnp.array([4, 2]), targets, jax.random.key(1), 0,
                            items=items)[0]

    g = jax.grad(loss)(params)
    grad = np.asarray(g["repeat_bias"][...])
    assert grad[0] == 0 and grad[1] == 0 and np.isfinite(grad).all()


def test_repeat_offsets_do_not_scale_the_other_gradients_through_the_clip():
    """The global-norm clip leaves the repeat offsets out: a huge gradient on them changes
    nothing in the other weights' updates (over two steps, so Adam's moments would show it)."""
    from genrec_jax.config import TrainConfig
    from genrec_jax.train.step import make_optimizer

    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, history_bias=True)
    params = nnx.state(SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx, _ = make_optimizer(TrainConfig(max_grad_norm=1.0, learning_rate=1e-2, warmup_steps=0, num_steps=10))

    def run(repeat_grad):
        p, opt = params, tx.init(params)
        for g_rep in (repeat_grad, 0.0):
            grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), p)
            grads["repeat_bias"][...] = jnp.full((len(SIZES),), g_rep)
            upd, opt = tx.update(grads, opt, p)
            p = optax.apply_updates(p, upd)
        return p

    a, b = run(1e4), run(0.0)
    assert not np.allclose(np.asarray(a["repeat_bias"][...]), np.asarray(b["repeat_bias"][...]))
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        if "repeat_bias" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_history_bias_scale_sets_the_offset_per_unit_of_parameter():
    """offset = history_bias_scale x parameter, so with the same Adam steps a 10x scale moves
    the offsets 10x as far (the other weights do not see the scale)."""
    from genrec_jax.config import ConfigError, load_config, preset_path

    for scale in (10.0, 100.0):
        cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=16, history_bias=True,
                            history_bias_scale=scale)
        dec = SemanticIDDecoder(8, SIZES, cfg, rngs=nnx.Rngs(0))
        dec.repeat_bias[...] = jnp.array([0.1, -0.2, -0.5])
        np.testing.assert_allclose(np.asarray(dec.repeat_offsets()), scale * np.array([0.1, -0.2, -0.5]), rtol=1e-6)
    with pytest.raises(ConfigError, match="history_bias_scale"):
        load_config(preset_path("tiny"), ["model.decoder.enabled=true", "model.decoder.history_bias=true",
                                          "model.decoder.history_bias_scale=0"])

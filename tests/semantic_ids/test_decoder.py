"""SemanticIDDecoder: cached decoding agrees with teacher forcing; memory masks; positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genrec_jax.config import DecoderConfig, MoEConfig
from genrec_jax.semantic_ids.decoder import SemanticIDDecoder, sample_positions

SIZES = (5, 4, 3)


def test_cached_decoding_matches_uncached_and_memory_is_causal():
    """MoE FFN decoder: decode_step with the KV cache gives the teacher-forced logits, and
    memory positions past the mask do not change anything."""
    cfg = DecoderConfig(enabled=True, num_layers=2, num_heads=2, head_dim=8, ffn_dim=16, dropout=0.0, use_moe=True)
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=16, routing="dense")
    dec = SemanticIDDecoder(12, SIZES, cfg, moe=moe, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dec)
    b, w, m = 3, 4, 6
    key = jax.random.key(1)
    states = jax.random.normal(key, (b, m, 12))
    lengths = jnp.array([6, 2, 4])
    codes = jnp.stack([jax.random.randint(jax.random.fold_in(key, i), (b, w), 0, k) for i, k in enumerate(SIZES)], -1)
    mask = jnp.broadcast_to(jnp.arange(m) <= 2, (b, w, m)) & (jnp.arange(m) < lengths[:, None, None])

    @jax.jit
    def run(state, states):
        d = nnx.merge(graphdef, state)
        cross = d.prefill(states, lengths)
        full, _ = d(codes, cross)  # teacher forcing, every level at once
        masked, _ = d(codes, cross, mask)
        cache = d.init_cache(b, w)
        prev = jnp.zeros((b, w), jnp.int32)
        steps = []
        for level in range(len(SIZES)):
            logits, cache = d.decode_step(prev, level, cache, cross)
            steps.append(logits)
            prev = codes[..., level]
        return full, masked, steps

    full, masked, steps = run(state, states)
    for level in range(len(SIZES)):
        np.testing.assert_allclose(np.asarray(steps[level]), np.asarray(full[level]), rtol=1e-4, atol=1e-5,
                                   err_msg=f"cached logits differ from uncached at level {level}")
    _, masked2, _ = run(state, states.at[:, 3:].set(100.0))  # change only the hidden memory
    for a, c in zip(masked, masked2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5,
                                   err_msg="a position saw encoder states after it")


def test_sample_positions_always_include_last_and_are_distinct():
    lengths = jnp.array([1, 3, 8, 0])
    pos, valid = jax.jit(sample_positions, static_argnums=(1, 2))(lengths, 8, 4, jax.random.key(0))
    pos, valid = np.asarray(pos), np.asarray(valid)
    for row, n in enumerate([1, 3, 8, 0]):
        real = pos[row][valid[row]]
        if n:
            assert real[0] == n - 1
        assert len(set(real.tolist())) == len(real), "positions repeat"
        assert (real < max(n, 1)).all()
        assert len(real) == min(n, 4)


@pytest.mark.parametrize("positions", [0, 3])
def test_history_unlikelihood_teaches_the_decoder_not_to_repeat(positions):
    """Planted data where the next item is drawn uniformly among the items *not* yet seen:
    trained with the unlikelihood term, the decoder gives seen items much less probability
    than trained on the cross entropy alone, and still fits the targets. ``positions``: the
    term on every trained position (0) or on 3 drawn per sequence."""
    import optax

    from genrec_jax.semantic_ids.decoder import decoder_loss

    v, n, b, d = 12, 6, 32, 16
    rng = np.random.default_rng(0)
    codes = np.stack(np.unravel_index(rng.permutation(np.prod(SIZES))[:v], SIZES), -1)
    item_codes = jnp.asarray(np.concatenate([np.zeros((1, 3), int), codes]), jnp.int32)  # row 0 = padding
    item_vecs = jnp.asarray(rng.normal(size=(v + 1, d)), jnp.float32)

    def batch(seed):
        r = np.random.default_rng(seed)
        seqs = np.stack([r.permutation(np.arange(1, v + 1))[:n + 1] for _ in range(b)])  # no repeats
        items, targets = seqs[:, :n], seqs[:, 1:]
        states = jnp.cumsum(item_vecs[items], axis=1)  # memory state at i: what was seen up to i
        return jnp.asarray(items), jnp.asarray(targets), states

    cfg = DecoderConfig(enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=32, dropout=0.0)
    lengths = jnp.full((b,), n)

    def train(weight):
        dec = SemanticIDDecoder(d, SIZES, cfg, rngs=nnx.Rngs(0))
        gd, params = nnx.split(dec)
        tx = optax.adam(3e-3)
        opt = tx.init(params)

        def loss_fn(p, items, targets, states, key):
            ce, m = decoder_loss(nnx.merge(gd, p), item_codes, states, lengths, targets, key, 0, items=items,
                                 unlikelihood=max(weight, 1e-9), unlikelihood_levels=1,
                                 unlikelihood_positions=positions)
            return ce + (m["decoder_unlikelihood_loss"] if weight > 0 else 0.0), (ce, m)

        @jax.jit
        def step(p, opt, items, targets, states, key):
            (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, items, targets, states, key)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt, aux

        for i in range(300):
            params, opt, _ = step(params, opt, *batch(i), jax.random.key(i))
        _, (ce, m) = jax.jit(loss_fn)(params, *batch(10_000), jax.random.key(10_000))
        return float(ce), float(m["decoder_history_prob"])

    ce0, p0 = train(0.0)
    ce1, p1 = train(1.0)
    assert np.isfinite([ce0, ce1, p0, p1]).all()
    assert p1 < 0.5 * p0, (p0, p1)
    assert ce1 < ce0 + 0.1, (ce0, ce1)  # the targets are still fitted

"""SemanticIDDecoder: cached decoding agrees with teacher forcing; memory masks; positions."""

import jax
import jax.numpy as jnp
import numpy as np
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

"""Model-level properties: causality, padding invariance, incremental = full, M-FALCON."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from genrec_jax.config import load_config, preset_path
from genrec_jax.model.recommender import build_model

NUM_ITEMS, NUM_ACTIONS = 50, 5


def make_model(*overrides, max_len=16):
    cfg = load_config(preset_path("tiny"), ["model.dropout=0.0", *overrides])
    return build_model(cfg.model, num_items=NUM_ITEMS, num_actions=NUM_ACTIONS, max_len=max_len, seed=0,
                       action_names=("view", "like", "share", "skip", "purchase"))


def random_batch(rng, b, n, lengths=None):
    lengths = rng.integers(1, n + 1, b) if lengths is None else np.asarray(lengths)
    ts = np.cumsum(rng.integers(0, 4000, (b, n)), axis=1).astype(np.int32)
    return {
        "items": rng.integers(1, NUM_ITEMS + 1, (b, n)).astype(np.int32),
        "actions": rng.integers(0, NUM_ACTIONS, (b, n)).astype(np.int32),
        "timestamps": ts,
        "query_timestamps": np.concatenate([ts[:, 1:], ts[:, -1:] + 60], axis=1).astype(np.int32),
        "lengths": lengths.astype(np.int32),
    }


@functools.lru_cache(maxsize=None)
def encoder(arch: str, extra: tuple = ()):
    model = make_model(f"model.arch={arch}", *extra)
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(batch):
        return nnx.merge(gd, params, rest).encode(batch)[0]

    return model, f


def jnp_batch(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
@given(seed=st.integers(0, 10_000), cut=st.integers(1, 11))
@settings(max_examples=8)
def test_model_is_causal(arch, seed, cut):
    """Changing events after position `cut` leaves every earlier output unchanged."""
    rng = np.random.default_rng(seed)
    _, f = encoder(arch)
    b = random_batch(rng, 2, 12, lengths=[12, 12])
    base = np.asarray(f(jnp_batch(b)))
    b2 = {k: v.copy() for k, v in b.items()}
    b2["items"][:, cut:] = rng.integers(1, NUM_ITEMS + 1, b2["items"][:, cut:].shape)
    b2["actions"][:, cut:] = rng.integers(0, NUM_ACTIONS, b2["actions"][:, cut:].shape)
    changed = np.asarray(f(jnp_batch(b2)))
    np.testing.assert_allclose(changed[:, :cut], base[:, :cut], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[:, cut:], base[:, cut:])


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_padding_width_does_not_change_valid_outputs(arch):
    rng = np.random.default_rng(0)
    _, f = encoder(arch)
    b = random_batch(rng, 4, 16, lengths=[16, 9, 3, 1])
    short = {k: (v[:, :10] if v.ndim == 2 else v) for k, v in b.items()}
    short["lengths"] = np.minimum(b["lengths"], 10)
    b["lengths"] = short["lengths"]
    full = np.asarray(f(jnp_batch(b)))
    cut = np.asarray(f(jnp_batch(short)))
    for r, L in enumerate(short["lengths"]):
        np.testing.assert_allclose(full[r, :L], cut[r, :L], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(full[r]))


@functools.lru_cache(maxsize=None)
def incremental_fns():
    model, _ = encoder("hstu")
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def prefill(batch):
        states, _, caches = nnx.merge(gd, params, rest).encode(batch, return_cache=True)
        return states, caches

    @jax.jit
    def extend(batch, caches, start, k_ts):
        return nnx.merge(gd, params, rest).extend(batch, caches, start, k_ts)

    return prefill, extend


@given(seed=st.integers(0, 10_000), hist=st.integers(1, 10), new=st.integers(1, 5))
@settings(max_examples=8)
def test_incremental_encoding_equals_full_pass(seed, hist, new):
    """The serving prefix cache: encode a history, then only the new events, exactly.

    Fixed shapes as in serving: the cache has 16 slots, new tokens come padded to 5."""
    rng = np.random.default_rng(seed)
    _, f = encoder("hstu")
    prefill, extend = incremental_fns()
    n = hist + new
    b = random_batch(rng, 2, 16, lengths=[n, n])
    full = np.asarray(f(jnp_batch(b)))
    first = {k: v.copy() for k, v in b.items()}
    first["lengths"] = np.array([hist, hist], np.int32)
    states, caches = prefill(jnp_batch(first))
    newb = {k: jnp.asarray(np.pad(v[:, hist:n], ((0, 0), (0, 5 - new)))) for k, v in b.items() if v.ndim == 2}
    newb["lengths"] = jnp.array([new, new])
    newb["prev_timestamp"] = jnp.asarray(b["timestamps"][:, hist - 1])
    out, _ = extend(newb, caches, jnp.array([hist, hist]), jnp.asarray(b["timestamps"]))
    np.testing.assert_allclose(np.asarray(out)[:, :new], full[:, hist:n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(states)[:, :hist], full[:, :hist], rtol=1e-5, atol=1e-5)


def test_mfalcon_candidates_scored_against_cache_equal_full_pass():
    rng = np.random.default_rng(3)
    model, _ = encoder("hstu")
    hist, m = 6, 4
    b = random_batch(rng, 1, hist + m, lengths=[hist + m])
    req = b["timestamps"][:, hist - 1] + 100
    b["timestamps"][:, hist:] = req[:, None]
    b["query_timestamps"][:, hist:] = req[:, None]
    b["query_timestamps"][:, hist - 1] = req
    b["actions"][:, hist:] = NUM_ACTIONS  # unknown action slot
    full_b = dict(b, num_targets=np.array([m], np.int32))
    full = np.asarray(model.encode(jnp_batch(full_b))[0])
    first = {k: (v[:, :hist] if v.ndim == 2 else v) for k, v in b.items()}
    first["lengths"] = np.array([hist], np.int32)
    _, _, caches = model.encode(jnp_batch(first), return_cache=True)
    cand = {k: jnp.asarray(v[:, hist:]) for k, v in b.items() if v.ndim == 2}
    cand["lengths"] = jnp.array([m])
    cand["prev_timestamp"] = jnp.asarray(b["timestamps"][:, hist - 1])
    cand["num_targets"] = jnp.array([m])
    out, _ = model.extend(cand, caches, jnp.array([hist]), jnp.asarray(b["timestamps"][:, :hist]), candidates=True)
    # Candidates each see the history and themselves only: order and company do not matter.
    np.testing.assert_allclose(np.asarray(out)[0], full[0, hist:], rtol=1e-4, atol=1e-5)
    single = {k: v[:, 1:2] for k, v in cand.items() if k not in ("lengths", "prev_timestamp", "num_targets")}
    single.update(lengths=jnp.array([1]), prev_timestamp=cand["prev_timestamp"], num_targets=jnp.array([1]))
    one, _ = model.extend(single, caches, jnp.array([hist]), jnp.asarray(b["timestamps"][:, :hist]), candidates=True)
    np.testing.assert_allclose(np.asarray(one)[0, 0], full[0, hist + 1], rtol=1e-4, atol=1e-5)


def test_multiscale_prefix_runs_and_stays_causal():
    extra = ("model.multiscale.enabled=true", "model.multiscale.short_len=8", "model.multiscale.long_window=2",
             "model.multiscale.max_long_tokens=3", "model.multiscale.user_profile_dim=4",
             "model.group_norm=true")
    model, f = encoder("hstu", extra)
    rng = np.random.default_rng(0)
    b = random_batch(rng, 3, 8, lengths=[8, 5, 2])
    b["long_items"] = rng.integers(1, NUM_ITEMS + 1, (3, 3, 2)).astype(np.int32)
    b["long_items"][1, 1:] = 0  # row 1 has a single window, row 2 none
    b["long_items"][2] = 0
    b["long_actions"] = np.zeros((3, 3, 2), np.int32)
    b["long_timestamps"] = -np.arange(3, 0, -1)[None].repeat(3, 0).astype(np.int32) * 1000
    b["num_long"] = np.array([3, 1, 0], np.int32)
    b["user_features"] = rng.standard_normal((3, 4)).astype(np.float32)
    b["context"] = rng.integers(0, 24, (3, 2)).astype(np.int32)
    out = np.asarray(f(jnp_batch(b)))
    assert out.shape == (3, 8, model.cfg.embed_dim) and np.all(np.isfinite(out))
    # Row 2 (no long windows) is unaffected by what sits in the unused window slots.
    b2 = {k: v.copy() for k, v in b.items()}
    b2["long_items"][2] = rng.integers(1, NUM_ITEMS + 1, (3, 2))
    out2 = np.asarray(f(jnp_batch(b2)))
    np.testing.assert_allclose(out2[2, :2], out[2, :2], rtol=1e-5, atol=1e-5)
    # Later short events do not change earlier outputs.
    b3 = {k: v.copy() for k, v in b.items()}
    b3["items"][0, 5:] = rng.integers(1, NUM_ITEMS + 1, 3)
    out3 = np.asarray(f(jnp_batch(b3)))
    np.testing.assert_allclose(out3[0, :5], out[0, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("l2", [True, False])
def test_item_vectors_are_rows_of_the_item_table(l2):
    """``item_vectors(ids)`` (what the train step's losses read) equals ``item_table()[ids]``
    with and without the L2 normalisation, padding id 0 included."""
    model = make_model(f"model.l2_norm={str(l2).lower()}")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, NUM_ITEMS + 1, (3, 7)), jnp.int32)
    want = np.asarray(jnp.take(model.item_table(), ids, axis=0))
    got = np.asarray(model.item_vectors(ids))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


_LAST_CONFIGS = {
    "plain": (),
    "moe-gln": ("model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_dim=24",
                "model.group_norm=true"),
    "dense-ffn-causal-count": ("model.ffn=dense", "model.ffn_dim=48", "model.attn_norm=causal_count"),
    "multiscale": ("model.multiscale.enabled=true", "model.multiscale.short_len=8",
                   "model.multiscale.long_window=2", "model.multiscale.max_long_tokens=3",
                   "model.multiscale.user_profile_dim=4", "model.group_norm=true"),
}


@functools.lru_cache(maxsize=None)
def last_state_fns(name: str):
    model, f = encoder("hstu", _LAST_CONFIGS[name])
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def full(batch):
        m = nnx.merge(gd, params, rest)
        states, _, caches = m.encode(batch, return_cache=True)
        return m.last_states(states, batch["lengths"]), caches

    @jax.jit
    def last(batch):
        return nnx.merge(gd, params, rest).encode_last(batch, return_cache=True)

    return full, last


@pytest.mark.parametrize("name", sorted(_LAST_CONFIGS))
@given(seed=st.integers(0, 10_000))
@settings(max_examples=4, deadline=None)
def test_encode_last_equals_last_state_of_full_pass(name, seed):
    """Serving's user vector: the last layer run for the last event only equals the full
    pass's last state, and every layer's K/V is the full pass's."""
    rng = np.random.default_rng(seed)
    full, last = last_state_fns(name)
    b = random_batch(rng, 4, 12, lengths=[12, *rng.integers(1, 13, 3)])
    if name == "multiscale":
        b["long_items"] = rng.integers(0, NUM_ITEMS + 1, (4, 3, 2)).astype(np.int32)
        b["long_actions"] = np.zeros((4, 3, 2), np.int32)
        b["long_timestamps"] = -np.arange(3, 0, -1)[None].repeat(4, 0).astype(np.int32) * 1000
        b["num_long"] = rng.integers(0, 4, 4).astype(np.int32)
        b["user_features"] = rng.standard_normal((4, 4)).astype(np.float32)
        b["context"] = rng.integers(0, 24, (4, 2)).astype(np.int32)
    want, want_caches = full(jnp_batch(b))
    got, got_caches = last(jnp_batch(b))
    want, got = np.asarray(want), np.asarray(got)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_caches) == len(want_caches)
    for g, w in zip(got_caches, want_caches):
        np.testing.assert_allclose(np.asarray(g.k), np.asarray(w.k), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g.v), np.asarray(w.v), rtol=1e-5, atol=1e-5)


def test_attention_query_blocks_leave_the_encoder_unchanged():
    """``model.attention_query_block`` (XLA attention in blocks of queries) is a different
    schedule of the same model: same parameters, same encoder outputs."""
    rng = np.random.default_rng(3)
    b = jnp_batch(random_batch(rng, 3, 16, lengths=[16, 9, 1]))
    _, dense = encoder("hstu", ("model.attention_query_block=0",))
    model, blocked = encoder("hstu", ("model.attention_query_block=5",))
    assert all(layer.query_block == 5 for layer in model.layers)
    want, got = np.asarray(dense(b)), np.asarray(blocked(b))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

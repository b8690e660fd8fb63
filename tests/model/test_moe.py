"""MoE routing invariants: gates, blocked == dropless == dense, gradients reach chosen experts only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.config import MoEConfig
from genrec_jax.model.moe import HAS_RAGGED_DOT, MoEFFN, block_rows, gather_rows


def make(e=4, k=2, d=8, f=16, seed=0, block_size=512):
    moe = MoEFFN(d, MoEConfig(num_experts=e, top_k=k, expert_dim=f, block_size=block_size), rngs=nnx.Rngs(seed))
    # non-zero biases, so a padding row or a wrong expert's bias would show
    moe.b1[...] = jax.random.normal(jax.random.key(seed + 100), moe.b1[...].shape)
    moe.b2[...] = jax.random.normal(jax.random.key(seed + 101), moe.b2[...].shape)
    return moe


def test_gates_are_a_distribution_over_the_chosen_experts():
    moe = make(e=6, k=3)
    x = jax.random.normal(jax.random.key(0), (40, 8))
    _, probs, top_e, gates = moe.route(x)
    np.testing.assert_allclose(np.asarray(gates.sum(-1)), 1.0, rtol=1e-6)
    assert np.all(np.asarray(gates) > 0)
    # The chosen experts are the k most probable, all distinct.
    top_sorted = np.sort(np.asarray(top_e), axis=1)
    assert np.all(np.diff(top_sorted, axis=1) > 0)
    best = np.argsort(-np.asarray(probs), axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(best, 1), top_sorted)


@pytest.mark.skipif(not HAS_RAGGED_DOT, reason="this JAX has no jax.lax.ragged_dot")
@pytest.mark.parametrize("k", [1, 2, 4])
def test_dropless_equals_dense_on_the_same_routing(k):
    moe = make(e=4, k=k)
    x = jax.random.normal(jax.random.key(1), (3, 7, 8))
    dropless, aux1 = moe(x, routing="dropless")
    dense, aux2 = moe(x, routing="dense")
    np.testing.assert_allclose(np.asarray(dropless), np.asarray(dense), rtol=1e-5, atol=1e-5)
    for key in aux1:
        np.testing.assert_allclose(float(aux1[key]), float(aux2[key]), rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 40), e=st.integers(1, 6), k_frac=st.floats(0, 1), block=st.sampled_from([1, 2, 3, 8, 512]),
       seed=st.integers(0, 2**16))
def test_blocked_equals_dense_in_value_and_gradient(t, e, k_frac, block, seed):
    """Every token count, expert count, k and block size (empty experts and one-row blocks
    included): the blocked routing gives the dense routing's output and gradients (float32)."""
    k = 1 + int(k_frac * (e - 1))
    moe = make(e=e, k=k, seed=seed % 7, block_size=block)
    x = jax.random.normal(jax.random.key(seed), (t, 8))
    gd, params = nnx.split(moe, nnx.Param)

    def loss(p, x, routing):
        y, _ = nnx.merge(gd, p)(x, routing=routing)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), y

    (_, yb), gb = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, "blocked")
    (_, yd), gdn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, "dense")
    assert np.all(np.isfinite(np.asarray(yb)))
    np.testing.assert_allclose(np.asarray(yb), np.asarray(yd), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gdn)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_remat_blocks_changes_nothing_but_memory():
    """model.moe.remat_blocks recomputes the block weights in the backward pass: same
    outputs and gradients (float32) as keeping them."""
    import dataclasses

    moe = make(e=4, k=2, block_size=4)
    x = jax.random.normal(jax.random.key(11), (13, 8))
    out = []
    for remat in (False, True):
        moe.cfg = dataclasses.replace(moe.cfg, remat_blocks=remat)
        gd, params = nnx.split(moe, nnx.Param)
        out.append(jax.value_and_grad(lambda p, x: jnp.sum(jnp.tanh(nnx.merge(gd, p)(x, routing="blocked")[0])),
                                      argnums=(0, 1))(params, x))
    (v0, g0), (v1, g1) = out
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_RAGGED_DOT, reason="this JAX has no jax.lax.ragged_dot")
def test_blocked_equals_dropless_on_a_skewed_routing():
    """Most tokens on one expert (a padded block per expert, one much longer group)."""
    moe = make(e=4, k=2, block_size=4)
    moe.router[...] = moe.router[...].at[:, 0].add(3.0)
    x = jax.random.normal(jax.random.key(9), (2, 11, 8))
    a, _ = moe(x, routing="blocked")
    b, _ = moe(x, routing="dropless")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("copies,experts,cap,want", [(65536, 8, 512, 512), (64, 8, 512, 8), (100, 4, 512, 32),
                                                      (1, 1, 512, 8), (10**6, 8, 256, 256), (40, 4, 4, 4)])
def test_block_rows(copies, experts, cap, want):
    assert block_rows(copies, experts, cap) == want


def test_unknown_routing_names_the_key():
    moe = make()
    with pytest.raises(ValueError, match="moe.routing"):
        moe(jnp.ones((2, 8)), routing="capacity")


@pytest.mark.parametrize("routing", ["blocked", "dense"] + (["dropless"] if HAS_RAGGED_DOT else []))
def test_gradient_flows_to_selected_experts_only(routing):
    moe = make(e=5, k=1)
    x = jax.random.normal(jax.random.key(2), (6, 8))
    _, _, top_e, _ = moe.route(x)
    chosen = set(np.asarray(top_e).ravel().tolist())
    gd, params = nnx.split(moe, nnx.Param)

    def loss(p):
        y, _ = nnx.merge(gd, p)(x, routing=routing)
        return jnp.sum(y ** 2)

    g = jax.grad(loss)(params)
    gw1 = np.asarray(g["w1"][...])
    for e in range(5):
        norm = np.abs(gw1[e]).sum()
        assert (norm > 0) == (e in chosen), f"expert {e}: grad norm {norm}, chosen {sorted(chosen)}"


def test_balance_loss_is_minimal_for_uniform_routing():
    moe = make(e=4, k=1)
    # Uniform router probabilities and perfectly even assignment give balance = 1 (E * sum 1/E * 1/E * E).
    moe.router[...] = jnp.zeros_like(moe.router[...])
    x = jax.random.normal(jax.random.key(3), (64, 8))
    _, aux = moe(x)
    importance = 0.25
    # all tokens tie -> top_k picks expert 0: load (1,0,0,0), importance 1/4 each
    np.testing.assert_allclose(float(aux["moe_balance_loss"]) / moe.cfg.balance_loss_weight, 4 * 1.0 * importance,
                               rtol=1e-6)
    np.testing.assert_allclose(float(aux["moe_load_max"]), 4.0, rtol=1e-6)


def test_padding_tokens_do_not_count_in_the_load():
    moe = make(e=4, k=2)
    x = jax.random.normal(jax.random.key(4), (2, 5, 8))
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    _, a = moe(x, valid=valid)
    x2 = x.at[0, 3:].set(100.0).at[1, 2:].set(-100.0)
    _, b = moe(x2, valid=valid)
    for key in ("moe_balance_loss", "moe_z_loss", "moe_load_max"):
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-6)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
@pytest.mark.parametrize("routing", ["blocked", "dense"] + (["dropless"] if HAS_RAGGED_DOT else []))
@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=4)], ids=str)
def test_data_parallel_routing_stays_on_each_shard(routing, axes):
    """Under a data / fsdp mesh every device routes its own tokens: output and gradients equal
    the single-device run, and the compiled step gathers no tokens (the global sort of the
    copies by expert would otherwise pull every token onto every device)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from genrec_jax.config import MeshConfig
    from genrec_jax.sharding import make_mesh

    full = dict(data=1, fsdp=1, tensor=1, expert=1)
    full.update(axes)
    mesh = make_mesh(MeshConfig(**full))
    moe = make(e=4, k=2, d=8, f=16, seed=3)
    gd, params = nnx.split(moe)
    x = jax.random.normal(jax.random.key(5), (8 * 24, 8))

    def loss(p, x):
        y, aux = nnx.merge(gd, p)(x, routing=routing)
        return jnp.sum(jnp.tanh(y)) + aux["moe_balance_loss"], y

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (ref_l, ref_y), ref_g = f(params, x)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        (l, y), g = f(params, xs)
        hlo = f.lower(params, xs).compile().as_text()
    np.testing.assert_allclose(l, ref_l, rtol=1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert "all-gather" not in hlo


def _expert_mesh():
    from genrec_jax.config import MeshConfig
    from genrec_jax.sharding import make_mesh

    return make_mesh(MeshConfig(data=2, fsdp=1, tensor=1, expert=4))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
@pytest.mark.parametrize("routing", ["blocked", "dense"])
def test_all_to_all_dispatch_equals_the_unsharded_layer(routing):
    """moe.dispatch=all_to_all on a data=2 x expert=4 mesh (2 experts per device), dropless:
    output, balance loss and every gradient equal the one-device layer, no copy is dropped,
    and the compiled step moves the copies with all-to-alls."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = _expert_mesh()
    moe = make(e=8, k=2, d=8, f=16, seed=4)
    moe.cfg = dataclasses.replace(moe.cfg, dispatch="all_to_all")
    gd, params = nnx.split(moe)
    x = jax.random.normal(jax.random.key(6), (8 * 16, 8))

    def loss(p, x):
        y, aux = nnx.merge(gd, p)(x, routing=routing)
        return jnp.sum(jnp.tanh(y)) + aux["moe_balance_loss"], (y, aux)

    f = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (ref_l, (ref_y, ref_aux)), ref_g = f(params, x)
    assert "moe_dropped" not in ref_aux  # no mesh: the plain routing
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"), None)))
    with jax.set_mesh(mesh):
        (l, (y, aux)), g = f(params, xs)
        hlo = f.lower(params, xs).compile().as_text()
    assert "all-to-all" in hlo
    assert float(aux["moe_dropped"]) == 0.0
    np.testing.assert_allclose(l, ref_l, rtol=1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
def test_all_to_all_capacity_drops_the_copies_past_each_receivers_slots():
    """With capacity_factor 0.5 a device keeps, per receiving device, the first ceil(0.5 x
    its copies / 4) copies in token order; the output is the gated sum over the kept
    copies only (a NumPy count of the same rule), and moe_dropped is their share."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = _expert_mesh()
    moe = make(e=8, k=2, d=8, f=16, seed=7)
    moe.cfg = dataclasses.replace(moe.cfg, dispatch="all_to_all", capacity_factor=0.5)
    t_local, devices, local = 16, 4, 2
    x = jax.random.normal(jax.random.key(8), (8 * t_local, 8))
    _, _, top_e, gates = moe.route(x)
    top_e, gates = np.asarray(top_e), np.asarray(gates)
    w = {n: getattr(moe, n)[...] for n in ("w1", "b1", "w2", "b2")}
    per_expert = np.stack([np.asarray(moe._experts_dense(x, jnp.full((len(x), 1), e), jnp.ones((len(x), 1)), **w))
                           for e in range(8)], 1)  # [T, E, D] each expert on every token
    cap = -(-int(0.5 * t_local * 2) // devices)
    want = np.zeros((len(x), 8))
    kept_n = 0
    for shard in range(8):  # tokens split contiguously over (data, expert)
        rows = range(shard * t_local, (shard + 1) * t_local)
        used = np.zeros(devices, int)
        for r in rows:
            for j in range(2):
                dest = top_e[r, j] // local
                if used[dest] < cap:
                    used[dest] += 1
                    kept_n += 1
                    want[r] += gates[r, j] * per_expert[r, top_e[r, j]]
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"), None)))
    with jax.set_mesh(mesh):
        y, aux = jax.jit(lambda x: moe(x))(xs)
    assert 0 < kept_n < len(x) * 2
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux["moe_dropped"]), 1 - kept_n / (len(x) * 2), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_rows_gradient_is_the_inverse_gather(seed):
    """gather_rows equals the plain fill-gather in value and gradient on a random one-to-one
    placement with padding rows, and its backward holds no scatter."""
    rng = np.random.default_rng(seed)
    n, rows, d = 37, 48, 5
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    row = rng.permutation(rows)[:n].astype(np.int32)  # copy -> padded row, one-to-one
    src = np.full(rows, n, np.int32)
    src[row] = np.arange(n)  # padded row -> copy (n = padding)
    w = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    plain = lambda x: jnp.sum(jnp.sin(x.at[src].get(mode="fill", fill_value=0)) * w)  # noqa: E731
    ours = lambda x: jnp.sum(jnp.sin(gather_rows(x, jnp.asarray(src), jnp.asarray(row))) * w)  # noqa: E731
    np.testing.assert_array_equal(gather_rows(x, jnp.asarray(src), jnp.asarray(row)),
                                  x.at[src].get(mode="fill", fill_value=0))
    g_plain, g_ours = jax.grad(plain)(x), jax.grad(ours)(x)
    assert np.all(np.isfinite(np.asarray(g_ours)))
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-6, atol=1e-6)
    # and the other direction (padded rows -> copies; padding rows get zero gradient)
    y = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    back = jax.grad(lambda y: jnp.sum(jnp.cos(gather_rows(y, jnp.asarray(row), jnp.asarray(src)))))(y)
    want = jax.grad(lambda y: jnp.sum(jnp.cos(y[row])))(y)
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-6)
    hlo = jax.jit(jax.grad(ours)).lower(x).as_text()
    assert "scatter" not in hlo
    assert "scatter" in jax.jit(jax.grad(plain)).lower(x).as_text()  # what it replaces


def test_blocked_routing_has_no_loop_or_sort():
    """The blocked routing places copies by a running count and finds each block's expert by
    comparisons: its compiled step (forward and backward) holds no while loop, which XLA
    drives from the host one iteration at a time, and no sort."""
    moe = make(e=8, k=2)
    x = jax.random.normal(jax.random.key(3), (64, 8))
    gd, params = nnx.split(moe, nnx.Param)

    def loss(p, x):
        y, aux = nnx.merge(gd, p)(x, routing="blocked")
        return jnp.sum(y ** 2) + sum(aux.values())

    hlo = jax.jit(jax.grad(loss)).lower(params, x).as_text()
    assert "stablehlo.while" not in hlo
    assert "stablehlo.sort" not in hlo
    # what the default binary search would have put there
    pend = jnp.arange(1, 9)
    assert "stablehlo.while" in jax.jit(lambda v: jnp.searchsorted(pend, v, side="right")).lower(jnp.arange(5)).as_text()

"""Sharded training equals unsharded training; checkpoints restore onto another mesh."""

import jax
import numpy as np
import pytest

from genrec_jax.config import MeshConfig, load_config, preset_path
from genrec_jax.data.registry import load_dataset
from genrec_jax.data.sequences import leave_one_out
from genrec_jax.model.recommender import build_model
from genrec_jax.sharding import ConfigError, logical_to_spec, make_mesh, mesh_shape, parse_mesh_arg
from genrec_jax.train.checkpoint import Checkpointer
from genrec_jax.train.loop import collate_options
from genrec_jax.data.batching import TrainLoader
from genrec_jax.train.step import StepBuilder

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

UGT = [
    "model.num_layers=1", "data.batch_size=16", "model.embed_dim=32", "model.num_heads=4", "model.attn_dim=8", "model.linear_dim=8",
    "model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_dim=32",
    "model.group_norm=true", "model.tasks.enabled=true", "model.tasks.hidden_dim=32",
    "model.tasks.num_candidates=2", "train.contrastive_weight=0.1", "model.dropout=0.0", "model.tasks.interaction=false",
]


@pytest.fixture(scope="module")
def setup_data():
    cfg = load_config(preset_path("tiny"), UGT)
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    loader = TrainLoader(split.train, batch_size=cfg.data.batch_size, max_len=cfg.data.max_seq_len,
                         bucket_sizes=cfg.data.bucket_sizes, seed=0, options=collate_options(cfg, ds, train=True))
    batches = [loader.next_batch() for _ in range(2)]
    return cfg, ds, split, batches


@pytest.fixture(scope="module")
def single_device_losses(setup_data):
    cfg, ds, split, batches = setup_data
    return run_steps(cfg, ds, split, batches, MeshConfig(data=1), devices=jax.devices()[:1])[0]


def run_steps(cfg, ds, split, batches, mesh_cfg: MeshConfig, devices=None):
    mesh = make_mesh(mesh_cfg, devices)
    model = build_model(cfg.model, num_items=ds.num_items, num_actions=ds.num_actions,
                        max_len=cfg.data.max_seq_len, seed=0, action_names=tuple(ds.action_names))
    steps = StepBuilder(model, cfg.train, mesh, item_counts=ds.item_popularity(split.train))
    state = steps.init_state()
    losses = []
    for b in batches:
        state, m = steps.train_step(state, steps.device_batch(b))
        losses.append(float(m["loss"]))
        if "moe_dropped" in m:  # explicit all-to-all dispatch: dropless here, nothing may drop
            assert float(m["moe_dropped"]) == 0.0
    return losses, state, steps


@needs8
@pytest.mark.parametrize("mesh", [
    dict(data=8), dict(data=1, fsdp=8), dict(data=2, tensor=2, expert=2),
], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_train_step_equals_single_device(setup_data, single_device_losses, mesh):
    cfg, ds, split, batches = setup_data
    ref = single_device_losses
    full = dict(data=1, fsdp=1, tensor=1, expert=1)
    full.update(mesh)
    got, state, _ = run_steps(cfg, ds, split, batches, MeshConfig(**full))
    assert all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The parameters really are split across devices on the model-parallel axes.
    if mesh.get("tensor", 1) > 1 or mesh.get("fsdp", 1) > 1 or mesh.get("expert", 1) > 1:
        leaves = jax.tree.leaves(state["params"])
        assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in leaves)


@needs8
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4)], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_step_with_dropout_equals_single_device(setup_data, single_device_losses, mesh):
    """Dropout on (rate 0.1): the masks do not depend on the mesh (JAX's threefry generator
    draws each device's slice of the same bits), so the sharded losses still equal one device's."""
    import copy

    cfg, ds, split, batches = setup_data
    cfg = copy.deepcopy(cfg)
    cfg.model.dropout = 0.1
    ref = run_steps(cfg, ds, split, batches, MeshConfig(data=1), devices=jax.devices()[:1])[0]
    assert not np.allclose(ref, single_device_losses, rtol=1e-4)  # dropout changed the losses
    full = dict(data=1, fsdp=1, tensor=1, expert=1)
    full.update(mesh)
    got = run_steps(cfg, ds, split, batches, MeshConfig(**full))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs8
def test_all_to_all_expert_dispatch_train_step_equals_single_device(setup_data, single_device_losses):
    """model.moe.dispatch=all_to_all on data=2 x expert=4 (one expert per device, dropless):
    the same losses as one device, the expert weights split over the expert axis, and the
    step logs no dropped copy."""
    import copy

    cfg, ds, split, batches = setup_data
    cfg = copy.deepcopy(cfg)
    cfg.model.moe.dispatch = "all_to_all"
    got, state, steps = run_steps(cfg, ds, split, batches, MeshConfig(data=2, fsdp=1, tensor=1, expert=4))
    assert "moe_dropped" in steps.train_step(state, steps.device_batch(batches[0]))[1]
    np.testing.assert_allclose(got, single_device_losses, rtol=1e-5, atol=1e-5)
    assert state["params"]["layers"][0]["ffn"]["w1"][...].sharding.mesh.shape["expert"] == 4


@needs8
def test_checkpoint_restores_onto_another_mesh(setup_data, tmp_path):
    cfg, ds, split, batches = setup_data
    _, state, steps = run_steps(cfg, ds, split, batches[:1], MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    ck = Checkpointer(tmp_path)
    ck.save(1, state, {"note": "x"})
    ck.close()
    # Restore onto a different layout: 4-way expert x 2-way data.
    mesh2 = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1, expert=4))
    model = build_model(cfg.model, num_items=ds.num_items, num_actions=ds.num_actions,
                        max_len=cfg.data.max_seq_len, seed=0, action_names=tuple(ds.action_names))
    steps2 = StepBuilder(model, cfg.train, mesh2, item_counts=ds.item_popularity(split.train))
    ck2 = Checkpointer(tmp_path)
    restored, meta, step = ck2.restore(steps2.abstract_state())
    ck2.close()
    assert step == 1 and meta["note"] == "x"
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exp_leaf = restored["params"]["layers"][0]["ffn"]["w1"][...]
    assert exp_leaf.sharding.mesh.shape["expert"] == 4
    # Training continues on the new mesh with the same loss as on the old one.
    s_old, m_old = steps.train_step(state, steps.device_batch(batches[1]))
    s_new, m_new = steps2.train_step(restored, steps2.device_batch(batches[1]))
    np.testing.assert_allclose(float(m_new["loss"]), float(m_old["loss"]), rtol=1e-5)


def test_mesh_shape_errors_name_the_problem():
    assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    with pytest.raises(ConfigError, match="multiply to 3"):
        mesh_shape(MeshConfig(data=3, fsdp=1), 8)
    with pytest.raises(ConfigError, match="unknown axis"):
        parse_mesh_arg("data=2,model=4")
    assert parse_mesh_arg("data=64,fsdp=8,tensor=4,expert=8") == {"data": 64, "fsdp": 8, "tensor": 4, "expert": 8}


def test_logical_rules_skip_indivisible_and_reused_axes():
    sizes = {"data": 2, "fsdp": 2, "tensor": 4, "expert": 1}
    assert tuple(logical_to_spec(("embed", "mlp"), (64, 256), sizes)) == ("fsdp", "tensor")
    # 6 is not divisible by 4: the dimension stays replicated.
    assert tuple(logical_to_spec(("vocab", "embed"), (6, 64), sizes)) == (None, "fsdp")
    # Two logical names mapping to the same mesh axis: only the first takes it.
    assert tuple(logical_to_spec(("heads", "mlp"), (8, 8), sizes)) == ("tensor", None)

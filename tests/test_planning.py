"""Dry-run planning numbers against a hand count for the tiny preset."""

import io

from genrec_jax.config import load_config, preset_path
from genrec_jax.planning import attention_flops_per_token, dry_run_main, flops_per_token, make_plan


def hand_count_tiny() -> int:
    d, h, dqk, dv, n, t, items, actions = 32, 2, 16, 16, 16, 32, 120, 5
    embeddings = (items + 1) * d + (actions + 1) * d + t * d + (n + 1) * d
    layer = (2 * d  # input LayerNorm
             + d * h * (2 * dv + 2 * dqk) + h * (2 * dv + 2 * dqk)  # W1, b1
             + 2 * h * dv  # LayerNorm of A V
             + h * dv * d + d  # W2, b2
             + (n + 1) + t)  # rab tables
    return embeddings + 2 * layer + 2 * d  # + final LayerNorm


def test_parameter_count_matches_hand_count():
    cfg = load_config(preset_path("tiny"))
    plan = make_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, num_items=120)
    assert plan.num_params == hand_count_tiny() == 16610
    assert plan.num_params_item_table == 121 * 32
    assert plan.bytes_params == 16610 * 4 and plan.bytes_optimizer == 2 * plan.bytes_params


def test_flops_per_token_matches_hand_count():
    cfg = load_config(preset_path("tiny"))
    d, h, dqk, dv, n = 32, 2, 16, 16, 16
    layer = 2 * d * h * (2 * dv + 2 * dqk) + 2 * h * (dqk + dv) * (n + 1) / 2 + 2 * h * dv * d
    assert flops_per_token(cfg, 120) == 2 * layer + 2 * d * 121 == 30400
    assert attention_flops_per_token(cfg) == 2 * 2 * h * (dqk + dv) * (n + 1) / 2 == 2176


def test_mfu_bound_rows_follow_from_their_parts(tmp_path):
    """bench/mfu_bound.py on the tiny preset (CPU, XLA attention): the step floor is the
    layers' attention plus the other model FLOPs at the given peak, and the ceiling is the
    step's FLOPs over that floor."""
    import json

    from bench.mfu_bound import main

    out = tmp_path / "rows.jsonl"
    assert main(["--config", "tiny", "--attention", "xla,triton", "--reps", "2", "--rounds", "1",
                 "--peak-tflops", "0.5", "--json", str(out)]) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]  # triton skipped on the CPU
    cfg = load_config(preset_path("tiny"))
    tokens = cfg.data.batch_size * cfg.data.max_seq_len
    f_step = 3 * flops_per_token(cfg, cfg.data.synthetic.num_items) * tokens
    f_rest = f_step - 3 * attention_flops_per_token(cfg) * tokens
    assert row["backend"] == "xla" and row["attention_ms_per_layer"] > 0
    assert abs(row["rest_at_peak_ms"] - f_rest / 0.5e12 * 1e3) < 1e-9
    assert abs(row["step_floor_ms"] - (2 * row["attention_ms_per_layer"] + row["rest_at_peak_ms"])) < 1e-9
    assert abs(row["mfu_ceiling"] - f_step / (row["step_floor_ms"] * 1e-3) / 0.5e12) < 1e-9
    assert 0 < row["mfu_ceiling"] < f_step / f_rest  # the attention takes some time


def test_sharding_divides_the_per_device_bytes():
    cfg = load_config(preset_path("tiny"))
    one = make_plan(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, num_items=120)
    fsdp = make_plan(cfg, {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}, num_items=120)
    # Every "embed"-named dimension here is 32 (divisible by 2); norms and rab tables stay whole.
    assert fsdp.bytes_params < one.bytes_params
    assert fsdp.bytes_params > one.bytes_params / 2
    assert fsdp.tokens_per_device == one.tokens_per_device // 2


def test_dry_run_refuses_what_does_not_fit():
    cfg = load_config(preset_path("xl"), ["mesh.data=512", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1"])
    out = io.StringIO()
    assert dry_run_main(cfg, device_memory_gb=80, out=out) == 3
    assert "DOES NOT FIT" in out.getvalue() and "fsdp" in out.getvalue()
    cfg = load_config(preset_path("xl"))
    out = io.StringIO()
    assert dry_run_main(cfg, device_memory_gb=80, out=out) == 0
    assert "33.88 B" in out.getvalue()


def test_blocked_moe_weight_copies_are_counted():
    """blocked routing: + layers x 2 x blocks x D x F values over the same plan with the
    dense routing (which keeps no copies); blocks by hand for 64 x 16 tokens, k=2, E=4."""
    over = ["model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_dim=48",
            "model.moe.block_size=64", "data.batch_size=64"]
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    blocked = make_plan(load_config(preset_path("tiny"), over + ["model.moe.routing=blocked"]), mesh, num_items=120)
    dense = make_plan(load_config(preset_path("tiny"), over + ["model.moe.routing=dense"]), mesh, num_items=120)
    assert blocked.tokens_per_device == 64 * 16
    blocks = (64 * 16 * 2 + 4 * 63 + 63) // 64  # 2048 copies, 64-row blocks, 4 experts
    assert blocks == 36
    assert blocked.bytes_activations - dense.bytes_activations == 2 * 2 * blocks * 32 * 48 * 4
    remat = make_plan(load_config(preset_path("tiny"), over + ["model.moe.routing=blocked",
                                                               "model.moe.remat_blocks=true"]), mesh, num_items=120)
    assert remat.bytes_activations - dense.bytes_activations == 1 * 2 * blocks * 32 * 48 * 4  # one layer live


def test_all_to_all_dispatch_buffers_are_counted():
    """moe.dispatch=all_to_all over expert=4 with the dense routing: + layers x 3 x rows x D
    values (send, receive, return buffers), rows = 4 x slots; dropless slots = every local
    copy, capacity 1.0: ceil(copies / 4)."""
    over = ["model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_dim=48",
            "model.moe.routing=dense", "data.batch_size=64"]
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 4}
    plain = make_plan(load_config(preset_path("tiny"), over), mesh, num_items=120)
    tokens = 64 * 16 // 4
    assert plain.tokens_per_device == tokens
    for cf, slots in [(0.0, tokens * 2), (1.0, tokens * 2 // 4)]:
        a2a = make_plan(load_config(preset_path("tiny"), over + ["model.moe.dispatch=all_to_all",
                                                                 f"model.moe.capacity_factor={cf}"]),
                        mesh, num_items=120)
        assert a2a.bytes_activations - plain.bytes_activations == 2 * 3 * 4 * slots * 32 * 4


def test_stored_ds_of_the_triton_backward_is_counted_for_one_layer():
    """model.attention_dq_mode: the Triton backward's stored dS, one layer's worth, is part
    of the activations when it is used: sequences x heads x 128^2 x T (T + 1) / 2 values,
    T = ceil(N / 128); "auto" stores from N = 1024 only; the XLA attention never."""
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}

    def plan(n, mode, attention="triton"):
        over = [f"data.max_seq_len={n}", "data.batch_size=3", f"model.attention_dq_mode={mode}"]
        return make_plan(load_config(preset_path("tiny"), over), mesh, num_items=120, attention=attention)

    heads = load_config(preset_path("tiny")).model.num_heads
    t = -(-1100 // 128)
    extra = 3 * heads * 128 * 128 * t * (t + 1) // 2 * 4  # float32 model
    assert plan(1100, "stored").bytes_activations - plan(1100, "atomic").bytes_activations == extra
    assert plan(1100, "auto").bytes_activations == plan(1100, "stored").bytes_activations
    assert plan(500, "auto").bytes_activations == plan(500, "atomic").bytes_activations  # below 1,024
    assert plan(500, "stored").bytes_activations > plan(500, "atomic").bytes_activations
    assert plan(1100, "stored", "xla").bytes_activations == plan(1100, "atomic", "xla").bytes_activations

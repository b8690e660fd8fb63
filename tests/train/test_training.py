"""Training end to end on the tiny preset: learning, resume, errors, DPO."""

import math

import jax
import numpy as np
import pytest

from genrec_jax.config import load_config, preset_path
from genrec_jax.train import cli
from genrec_jax.train.loop import RunDirError, TrainingDiverged, log_hook, run
from genrec_jax.train.logging import read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(preset_path("tiny"), ["train.num_steps=150", "train.log_every=10"])
    res = run(cfg, out, progress=False, log=lambda s: None)
    return cfg, out, res


def test_loss_falls_and_model_beats_popularity(trained):
    _, out, res = trained
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    r = res["results"]
    assert r["HSTU"]["HR@10"] > 1.3 * r["popularity"]["HR@10"], r
    assert r["HSTU"]["NDCG@10"] > 1.3 * r["popularity"]["NDCG@10"], r
    assert (out / "results.json").exists() and (out / "config.yaml").exists()


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    over = ["train.num_steps=24", "train.checkpoint_every=8", "train.log_every=4", "eval.baselines=false"]
    cfg = load_config(preset_path("tiny"), over)
    full = run(cfg, tmp_path / "a", progress=False, evaluate=False, log=lambda s: None)
    # Killed at step 13, between the checkpoints of steps 8 and 16.
    part = run(cfg, tmp_path / "b", progress=False, evaluate=False, stop_after=13, log=lambda s: None)
    assert part["step"] == 13
    resumed = run(cfg, tmp_path / "b", resume=True, progress=False, evaluate=False, log=lambda s: None)
    assert resumed["step"] == 24
    for x, y in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_existing_run_needs_resume(trained, tmp_path):
    cfg, out, _ = trained
    with pytest.raises(RunDirError, match="--resume"):
        run(cfg, out, progress=False)


def test_non_finite_loss_stops_with_advice():
    class Ctx:
        class cfg:
            class train:
                log_every, num_steps, learning_rate = 1, 10, 0.1

        class checkpointer:
            directory = "/tmp/ck"

    with pytest.raises(TrainingDiverged, match="learning_rate"):
        log_hook(Ctx, 3, {"loss": np.float32("nan")})


def test_cli_reports_errors_without_a_traceback(capsys, tmp_path):
    assert cli.main(["--config", str(preset_path("tiny")), "--set", "model.num_layer=2"]) == 2
    assert "model.num_layer" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["--config", str(preset_path("beauty")), "--out", str(tmp_path / "r"),
                     "--set", "data.data_dir=" + str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err
    assert "sequential_data.txt" in err or "GENREC_DATA_DIR" in err


def test_dpo_improves_preference_margin_on_planted_pairs(trained):
    from genrec_jax.data.registry import load_dataset
    from genrec_jax.data.sequences import leave_one_out
    from genrec_jax.sharding import make_mesh
    from genrec_jax.train.dpo import DPOTrainer, PreferenceLoader
    from genrec_jax.train.restore import load_trained
    from genrec_jax.config import MeshConfig

    cfg, out, _ = trained
    cfg = load_config(preset_path("tiny"), ["train.dpo.learning_rate=0.001", "train.dpo.num_steps=40",
                                            "train.warmup_steps=5"])
    ds = load_dataset(cfg.data)
    split = leave_one_out(ds.sequences)
    loader = PreferenceLoader(split.train, tuple(ds.action_names), batch_size=32, max_len=16,
                              bucket_sizes=[16], seed=0)
    fixed = [loader.next_batch() for _ in range(4)]
    trainer = DPOTrainer(load_trained(out).model, load_trained(out).model, cfg,
                         make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    state = trainer.steps.init_state()

    def evaluate(state):
        from genrec_jax.train.dpo import dpo_loss
        from flax import nnx

        vals = []
        for b in fixed:
            dev = trainer.steps.device_batch(b)
            pol = trainer.steps.model(state["params"])
            ref = nnx.merge(trainer.ref_graph, trainer.ref_params, trainer.ref_rest)
            vals.append(float(dpo_loss(pol, ref, dev, None, trainer.beta)[0]))
        return np.mean(vals)

    before = evaluate(state)
    assert abs(before - math.log(2)) < 1e-5  # policy == reference: margin 0
    for i in range(40):
        state, m = trainer.step(state, fixed[i % 4])
    after = evaluate(state)
    assert after < before - 0.02, (before, after)

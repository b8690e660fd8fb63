"""The JAX functions behind the graphs: what they compute, and decode_step's parity per level."""

from __future__ import annotations

import numpy as np
import pytest

from genrec_jax.export import parity
from genrec_jax.export.graphs import ExportLimits, encoder_graph, prepare_model, ranker_unsupported


def test_prepare_model_forces_reference_attention_and_fp16(tiny_trained):
    import jax.numpy as jnp

    m = prepare_model(tiny_trained.model, "float16")
    assert all(layer.backend == "xla" for layer in m.layers)
    assert m.item_emb.embedding[...].dtype == jnp.float16 and m.dtype == jnp.float16
    assert tiny_trained.model.item_emb.embedding[...].dtype == jnp.float32, "the original model was modified"


def test_encoder_outputs_are_the_model_functions(tiny_trained):
    import jax.numpy as jnp

    model = prepare_model(tiny_trained.model)
    g = encoder_graph(model, ExportLimits(top_k=5))
    feeds = parity.random_feeds(g, model, {"B": 3, "L": 16}, seed=1)
    out = dict(zip([t.name for t in g.outputs], parity.reference(g, feeds)))
    import jax

    @jax.jit
    def direct(batch):
        states, _ = model.encode(batch)
        u = model.user_vectors(model.last_states(states, batch["lengths"]))
        return u, model.score_items(u)

    u, scores = direct({k: jnp.asarray(v) for k, v in feeds.items()})
    np.testing.assert_allclose(out["user_embedding"], np.asarray(u), rtol=1e-5, atol=1e-6)
    scores = np.array(scores)
    scores[:, 0] = -np.inf
    assert np.array_equal(out["topk_items"], np.argsort(-scores, axis=1, kind="stable")[:, :5])


def test_ranker_is_skipped_with_a_reason_for_unsupported_models(tiny_trained):
    import dataclasses

    from genrec_jax.model.recommender import build_model

    from flax import nnx

    cfg = dataclasses.replace(tiny_trained.cfg.model, tasks=dataclasses.replace(tiny_trained.cfg.model.tasks,
                                                                                 enabled=False))
    m = nnx.eval_shape(lambda: build_model(cfg, num_items=10, num_actions=2, max_len=4))
    assert "ranking heads" in ranker_unsupported(m)


def test_decode_step_parity_at_every_level(decoder_export, decoder_model, real_batch):
    """decode_step.onnx (fp32, fp16) vs the decoder's decode_step on random caches and along
    a real greedy decode, at each level (each level is its own If branch)."""
    reports = parity.check_export(decoder_export, decoder_model, {k: v[:16] for k, v in real_batch.items()
                                                                   if k != "history_items"})
    by = {(r.graph, r.precision, r.inputs): r for r in reports}
    levels = decoder_model.decoder.num_levels
    for prec in ("fp32", "fp16"):
        for lv in range(levels):
            assert ("decode_step", prec, f"random-level{lv}") in by
            assert ("decode_step", prec, f"real-level{lv}") in by
    bad = [(k, r.errors) for k, r in by.items() if not r.ok()]
    assert not bad, bad


def test_decode_step_logits_past_the_codebook_are_minus_inf(decoder_export, decoder_model):
    from genrec_jax.export.ort_client import OnnxRecommender

    client = OnnxRecommender(decoder_export.out_dir)
    g = decoder_export.graphs["decode_step"]
    feeds = parity.random_feeds(g, decoder_model, {"B": 2, "L": 16, "W": 3}, seed=0)
    sizes = decoder_model.decoder.code_sizes
    for lv, k in enumerate(sizes):
        feeds["level"] = np.array([lv], np.int32)
        logits = client.run("decode_step", feeds)["logits"]
        assert np.isfinite(logits[..., :k]).all() and np.isneginf(logits[..., k:]).all()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_encoder_cross_kv_matches_decoder_prefill(decoder_export, decoder_model, precision):
    import jax.numpy as jnp

    from genrec_jax.export.ort_client import OnnxRecommender

    client = OnnxRecommender(decoder_export.out_dir, precision=precision)
    g = decoder_export.graphs["encoder"]
    feeds = parity.random_feeds(g, decoder_model, {"B": 2, "L": 16}, seed=2)
    enc = client.encode(feeds)
    import jax

    model = prepare_model(decoder_model)

    @jax.jit
    def direct(batch):
        states, _ = model.encode(batch)
        return model.decoder.prefill(states, batch["lengths"])

    cross = direct({k: jnp.asarray(v) for k, v in feeds.items()})
    tol = parity.TOLERANCE[precision]
    assert parity.relative_error(enc["cross_k"], np.moveaxis(np.asarray(cross.k), 0, 1)) <= tol
    assert np.array_equal(enc["cross_valid"], np.asarray(cross.valid))


def test_moe_and_group_norm_encoder_exports_with_parity(tiny_trained, tmp_path):
    """The UGT variants (top-2 MoE FFN, Group LayerNorm, causal-count normalisation) export
    through the same path, fp32 and fp16 (the MoE router is an fp32 island of the fp16 graph)."""
    from genrec_jax.config import load_config
    from genrec_jax.export.onnx_export import export_model
    from genrec_jax.export.trt_lint import lint_model
    from genrec_jax.model.recommender import build_model
    from tests.conftest import REPO
    from tests.export.conftest import random_model

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "model.ffn=moe", "model.moe.num_experts=4", "model.moe.expert_dim=16", "model.group_norm=true",
        "model.attn_norm=causal_count", "model.num_layers=1"])
    model = random_model(lambda: build_model(cfg.model, num_items=40, num_actions=3, max_len=8))
    r = export_model(model, tmp_path, only=("encoder",), log=lambda *a: None)
    g = r.graphs["encoder"]
    feeds = [("random", parity.random_feeds(g, model, {"B": 3, "L": 8}))]
    for f, prec in (("encoder.onnx", "fp32"), ("encoder.fp16.onnx", "fp16")):
        (rep,) = parity.check_graph(g, tmp_path / f, feeds, precision=prec)
        assert rep.ok(), (prec, rep.errors)
        assert not [i for i in lint_model(tmp_path / f) if i.severity == "error"]

"""Shared fixtures: one tiny trained checkpoint and one engine per test session.

Training (a few steps of configs/tiny.yaml) and the engine's ahead-of-time compiles are
the slow parts, so both happen once; apps built on the shared engine are cheap.
"""

from __future__ import annotations

import numpy as np
import pytest

from genrec_jax.config import load_config, preset_path

# Small buckets keep the compile count (and the session time) low on a 2-core CPU.
SERVE_OVERRIDES = [
    "serve.batch_buckets=[4]",
    "serve.seq_buckets=[16]",
    "serve.extend_buckets=[4]",
    "serve.rank_micro_batch=16",
    "serve.max_candidates=64",
    "serve.prefix_cache_users=8",
    "serve.max_history_len=64",
    "serve.max_exclude=32",
    "serve.max_k=20",
    "serve.queue_size=16",
    "serve.max_wait_ms=2",
    "serve.max_body_bytes=20000",
    "serve.cold_start_capacity=4",
    # no load shedding on event-loop lag: a busy test machine would refuse requests at
    # random (test_app.py tests the shedding with its own setting)
    "serve.max_loop_lag_ms=0",
]
# XLA's quick CPU compile: halves the engines' start-up here; results are the same math.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained tiny run directory: HSTU + multi-task heads (a few steps), and the RQ-VAE
    stage (semantic IDs, for cold-start registration)."""
    from genrec_jax.semantic_ids.train_rqvae import run_rqvae
    from genrec_jax.train.loop import run

    cfg = load_config(preset_path("tiny"), [
        "train.num_steps=6", "train.warmup_steps=2", "train.checkpoint_every=0", "train.log_every=3",
        "data.bucket_sizes=[16]", "model.tasks.enabled=true", "model.tasks.interaction=false",
        "rqvae.num_steps=10", "rqvae.log_every=5", "rqvae.checkpoint_every=0",
    ])
    out = tmp_path_factory.mktemp("tiny_run")
    run(cfg, out, progress=False, evaluate=False, log=lambda *_: None)
    run_rqvae(cfg, out, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def item_features(tiny_run):
    """Raw content vectors of the tiny catalogue (what the RQ-VAE was trained on) [N + 1, F]."""
    from genrec_jax.data.registry import load_dataset
    from genrec_jax.data.sequences import leave_one_out
    from genrec_jax.semantic_ids.item_features import item_feature_matrix

    cfg = load_config(tiny_run / "config.yaml")
    ds = load_dataset(cfg.data)
    return item_feature_matrix(cfg.rqvae, ds, leave_one_out(ds.sequences).train)


@pytest.fixture(scope="session")
def engine(tiny_run):
    from genrec_jax.serve.engine import Engine

    return Engine.from_checkpoint(tiny_run, SERVE_OVERRIDES, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="session")
def serve_cfg(tiny_run):
    from genrec_jax.serve.cli import serve_config

    return serve_config(tiny_run, SERVE_OVERRIDES)


def _random_decoder_engine(*overrides, repeat_offsets=None):
    from genrec_jax.model.recommender import build_model
    from genrec_jax.semantic_ids.decoder import REPEAT_BIAS_SCALE
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.inputs import Catalog

    sizes, n = (8, 8, 4), 120
    cfg = load_config(preset_path("tiny"), [
        "model.decoder.enabled=true", "model.decoder.num_layers=1", "model.decoder.head_dim=8",
        "model.decoder.ffn_dim=32", "serve.beam_width=8", *SERVE_OVERRIDES, *overrides])
    rng = np.random.default_rng(0)
    flat = rng.choice(int(np.prod(sizes)), n, replace=False)
    codes = np.concatenate([np.zeros((1, 3), np.int64), np.stack(np.unravel_index(flat, sizes), 1)]).astype(np.int32)
    model = build_model(cfg.model, num_items=n, num_actions=5, max_len=cfg.data.max_seq_len, item_codes=codes,
                        code_sizes=sizes)
    if repeat_offsets is not None:
        model.decoder.repeat_bias[...] = np.asarray(repeat_offsets, np.float32) / REPEAT_BIAS_SCALE
    catalog = Catalog(["<pad>"] + [f"i{i}" for i in range(1, n + 1)], ["view", "like", "share", "skip", "purchase"])
    return Engine(model, catalog, cfg.serve, model_version="random-decoder", compiler_options=FAST_COMPILE,
                  heads=("generative",))  # retrieval and rank are tested on the trained engine


@pytest.fixture(scope="session")
def gen_engine():
    """An engine over a decoder model with random weights and random unique semantic IDs
    (generation is checked against the semantic_ids reference, not for quality)."""
    return _random_decoder_engine()


@pytest.fixture(scope="session")
def repeat_engine():
    """The same with a repeat-aware decoder (model.decoder.history_bias) whose last-level
    offset is -30: it must never write a history item."""
    return _random_decoder_engine("model.decoder.history_bias=true", repeat_offsets=[0.5, 1.0, -30.0])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def events(items, start_ts=1_700_000_000, gap=600, actions=None):
    """Request events (external ids) with regular timestamps."""
    out = []
    for i, it in enumerate(items):
        ev = {"item_id": it, "timestamp": start_ts + i * gap}
        if actions is not None:
            ev["action"] = actions[i]
        out.append(ev)
    return out


def concurrent_recommends(url: str, hists: list, user_prefix: str, threads: int = 16) -> list[list]:
    """POST every history to /v1/recommend (k=5, user ids ``<prefix><i % 7>``) from ``threads``
    callers at once; returns the item ids each caller got, in request order."""
    import concurrent.futures

    import httpx

    def call(i):
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/recommend", json={"history": hists[i], "k": 5, "user_id": f"{user_prefix}{i % 7}"})
            assert r.status_code == 200, r.text
            return [it["item_id"] for it in r.json()["items"]]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, range(len(hists))))

"""Session fixtures of the export tests: one tiny checkpoint, exported once.

``tiny_run`` is a checkpoint of the tiny preset (ranking heads on): by default its
initial parameters, saved through the training loop's own checkpointer (compiling a
train step costs more than the whole export test budget on two cores); set
``GENREC_EXPORT_TEST_RUN`` to a trained run directory to test that instead.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

TINY_OVERRIDES = ["model.tasks.enabled=true", "model.tasks.interaction=false", "train.seed=0"]
CODE_SIZES = (4, 4, 8)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    env = os.environ.get("GENREC_EXPORT_TEST_RUN")
    if env:
        return Path(env)
    from genrec_jax.config import load_config
    from genrec_jax.train.loop import save_checkpoint, setup

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", TINY_OVERRIDES)
    ctx = setup(cfg, out, progress=False)
    try:
        save_checkpoint(ctx, 0)
    finally:
        ctx.checkpointer.close()
        ctx.logger.close()
    return out


@pytest.fixture(scope="session")
def tiny_trained(tiny_run):
    from genrec_jax.train.restore import load_trained

    return load_trained(tiny_run)


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """(export dir, exit status, printed output) of ``python -m genrec_jax.export`` on the run."""
    import contextlib
    import io

    from genrec_jax.export.cli import main

    out = tmp_path_factory.mktemp("tiny_export")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--checkpoint", str(tiny_run), "--out", str(out), "--parity-users", "16"])
    return out, rc, buf.getvalue()


@pytest.fixture(scope="session")
def tiny_graphs(tiny_trained):
    """The fp32 graph definitions (JAX functions) the export traced."""
    from genrec_jax.export.graphs import build_graphs, prepare_model
    from genrec_jax.export.onnx_export import limits_from_config

    graphs, _ = build_graphs(prepare_model(tiny_trained.model), limits_from_config(tiny_trained.cfg))
    return {g.name: g for g in graphs}


def random_model(build, seed: int = 0):
    """``build()``'s model with random parameters, without compiling its initializers
    (abstract construction, then numpy values): parity only needs some weights."""
    import jax
    from flax import nnx

    abstract = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    params = nnx.state(abstract, nnx.Param)
    values = jax.tree.map(lambda x: jax.numpy.asarray((rng.standard_normal(x.shape) * 0.3).astype(x.dtype)), params)
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    rest = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, rest)
    return nnx.merge(graphdef, values, rest)


def item_codes(num_items: int) -> np.ndarray:
    """A unique code path per item (and padding row 0) for CODE_SIZES."""
    ids = np.arange(num_items + 1)
    return np.stack([(ids // 32) % 4, (ids // 8) % 4, ids % 8], 1).astype(np.int32)


def build_decoder_model(tm):
    """The tiny model with a small semantic-ID decoder (random init), same item catalogue."""
    from genrec_jax.model.recommender import build_model

    mc = tm.cfg.model
    dec = dataclasses.replace(mc.decoder, enabled=True, num_layers=1, num_heads=2, head_dim=8, ffn_dim=32)
    mc = dataclasses.replace(mc, decoder=dec)
    n = tm.model.num_items
    codes = item_codes(n)
    kw = dict(num_items=n, num_actions=tm.model.num_actions, max_len=tm.model.max_len,
              action_names=tm.model.action_names)
    return build_model(mc, item_codes=codes, code_sizes=CODE_SIZES, **kw)


@pytest.fixture(scope="session")
def decoder_model(tiny_trained):
    return build_decoder_model(tiny_trained)


@pytest.fixture(scope="session")
def decoder_export(decoder_model, tiny_trained, tmp_path_factory):
    """encoder + decode_step (fp32 and fp16) of the decoder model."""
    from genrec_jax.export.graphs import ExportLimits
    from genrec_jax.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("decoder_export")
    return export_model(decoder_model, out, info=tiny_trained.info, item_ids=tiny_trained.item_ids,
                        limits=ExportLimits(max_batch=8, opt_batch=4, beam_width=8, top_k=20),
                        only=("encoder", "decode_step"), log=lambda *a: None)


@pytest.fixture(scope="session")
def real_batch(tiny_trained):
    """Evaluation histories of 100 users of the tiny data set (collate_eval)."""
    from genrec_jax.export.parity import real_histories

    return real_histories(tiny_trained, 100)

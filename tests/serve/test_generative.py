"""The semantic-ID side of serving: trie-constrained beam search (mode=generative) and
cold-start registration through the RQ-VAE."""

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from genrec_jax.serve.app import create_app
from genrec_jax.serve.engine import RecommendJob
from genrec_jax.serve.errors import Conflict, RequestError
from genrec_jax.serve.generative import SemanticSide
from genrec_jax.serve.inputs import History

from .conftest import events

N = 120


def hist(n, seed=0):
    r = np.random.default_rng(seed)
    ts = np.cumsum(r.integers(1, 4000, n)) + 1_600_000_000
    return History(r.integers(1, N + 1, n).astype(np.int32), r.integers(0, 5, n).astype(np.int32), ts, int(ts[-1]))


def test_generative_batch_returns_distinct_items(gen_engine):
    """(Equality with beam search recomputed from scratch: test_baseline.py.)"""
    hs = [hist(n, seed=n) for n in (3, 9, 16, 20, 5)]  # 5 rows: two batches of the 4-bucket
    ids, scores = gen_engine.recommend_batch(hs, k=8, mode="generative")
    assert all(len(set(row)) == 8 and (row > 0).all() for row in ids), "beams must be distinct real items"
    assert (np.diff(scores, axis=1) <= 0).all(), "beams must come best first"


def test_generative_prefix_cache_and_exclusions(gen_engine):
    cold = gen_engine.process([RecommendJob(hist(12, 7), 5, "generative")])[0]
    gen_engine.process([RecommendJob(History(*[a[:9] for a in (hist(12, 7).items, hist(12, 7).actions,
                                                                 hist(12, 7).timestamps)], 0), 5, "generative",
                                     user_id="g")])
    warm = gen_engine.process([RecommendJob(hist(12, 7), 5, "generative", user_id="g")])[0]
    assert gen_engine.prefix.hits >= 1
    np.testing.assert_array_equal(warm.items, cold.items)
    np.testing.assert_allclose(warm.scores, cold.scores, rtol=1e-5, atol=1e-5)
    ex = gen_engine.process([RecommendJob(hist(12, 7), 5, "generative", exclude=cold.items[:2].copy())])[0]
    assert not set(ex.items) & set(cold.items[:2]) and list(ex.items[:3]) == list(cold.items[2:5])


def test_excluding_every_beam_still_returns_k_items(gen_engine):
    """Exclusions are applied inside the search, not only to the final beams: excluding all
    8 beams of a width-8 search gives 8 other items (a final-beam filter would leave none)."""
    h = hist(12, 7)
    first = gen_engine.process([RecommendJob(h, 8, "generative")])[0]
    again = gen_engine.process([RecommendJob(h, 8, "generative", exclude=first.items.copy())])[0]
    assert len(again.items) == 8 and len(set(again.items)) == 8
    assert not set(again.items.tolist()) & set(first.items.tolist())


def test_repeat_aware_decoder_keeps_history_items_out(repeat_engine):
    """The engine feeds each row's history to the repeat offsets: with a -30 offset at the
    last level no history item is written, without any exclusion list; the no-cache
    baseline (history looked up on the device, not the host) gives the same beams."""
    from genrec_jax.serve.baseline import NaiveEngine

    hs = [hist(n, seed=40 + n) for n in (3, 9, 16, 20, 5)]
    ids, scores = repeat_engine.recommend_batch(hs, k=8, mode="generative")
    for h, row in zip(hs, ids):
        assert (row > 0).all() and len(set(row)) == 8
        assert not set(row.tolist()) & set(h.window(repeat_engine.max_len).items.tolist()), "a history item came back"
    naive = NaiveEngine(repeat_engine._model, beam_width=repeat_engine.beam_width, trie=repeat_engine.semantic.trie)
    for i in (0, 2):
        want, want_scores = naive.recommend(hs[i], 8, mode="generative")
        np.testing.assert_array_equal(ids[i], want)
        np.testing.assert_allclose(scores[i], want_scores, rtol=1e-4, atol=1e-4)


def test_generative_over_http(gen_engine):
    with TestClient(create_app(gen_engine.cfg, gen_engine)) as c:
        while c.get("/readyz").status_code != 200:
            pass
        r = c.post("/v1/recommend", json={"history": events(["i1", "i2"]), "mode": "generative", "k": 4})
        assert r.status_code == 200 and len(r.json()["items"]) == 4
        r = c.post("/v1/recommend", json={"history": events(["i1"]), "mode": "generative", "k": 9})
        assert r.status_code == 422 and r.json()["error"]["field"] == "k"  # beam width 8
        r = c.post("/v1/items", json={"items": [{"item_id": "n", "features": [1.0]}]})
        assert r.status_code == 409 and "RQ-VAE" in r.json()["error"]["message"]
        r = c.post("/v1/recommend", json={"history": events(["i1"]), "k": 4})  # started with heads=("generative",)
        assert r.status_code == 409 and "retrieval head" in r.json()["error"]["message"]


def test_no_rq_vae_no_cold_start(gen_engine):
    assert "RQ-VAE" in SemanticSide(gen_engine._model, None).cold_start_reason()
    with pytest.raises(Conflict, match="RQ-VAE"):
        gen_engine.add_items([{"item_id": "n", "features": [1.0]}])


def test_cold_start_registration(engine, serve_cfg, item_features):
    """New items get semantic IDs and embeddings: recommendable, rankable, usable as input."""
    with TestClient(create_app(serve_cfg, engine)) as c:
        while c.get("/readyz").status_code != 200:
            pass
        assert c.get("/readyz").json()["cold_start_features"] == item_features.shape[1]
        pop = engine.semantic.item_popularity  # saved by training (placement without a decoder)
        assert pop is not None and len(pop) == engine.num_items + 1 and pop[0] == 0 and pop.sum() > 0
        before = c.get("/v1/items").json()["total"]
        new = [{"item_id": "cold-a", "features": item_features[5].tolist()},
               {"item_id": "cold-b", "features": (item_features[9] * 1.01).tolist()}]
        r = c.post("/v1/items", json={"items": new})
        assert r.status_code == 201, r.text
        added = r.json()["items"]
        assert [a["item_id"] for a in added] == ["cold-a", "cold-b"] and r.json()["total"] == before + 2
        assert all(len(a["semantic_id"]) == 3 for a in added) and added[0]["semantic_id"] != added[1]["semantic_id"]
        page = c.get("/v1/items", params={"offset": before, "limit": 10}).json()["items"]
        assert page == [{"item_id": "cold-a", "cold_start": True}, {"item_id": "cold-b", "cold_start": True}]
        r = c.post("/v1/rank", json={"history": events(["cold-a", "i3"]), "candidates": ["cold-b", "i4"]})
        assert r.status_code == 200, r.text
        assert c.post("/v1/items", json={"items": [new[0]]}).status_code == 422  # already registered
        many = [{"item_id": f"cold-{i}", "features": item_features[i].tolist()} for i in range(10, 13)]
        r = c.post("/v1/items", json={"items": many})  # capacity 4: 2 used, 3 more do not fit
        assert r.status_code == 409 and "capacity" in r.json()["error"]["message"]
    assert engine.compiles == len(engine.executables()), "registration must not recompile the encoder steps"
    with pytest.raises(RequestError, match="features"):
        engine.add_items([{"item_id": "w", "features": [0.0, 1.0]}])


def _as_served(model, dtype: str) -> None:
    """Round ``model``'s float parameters to the serving storage dtype and commit its state
    to the device, as the engine's are (in place; the library call then reuses the probe
    search the engine compiled)."""
    import jax.numpy as jnp
    from flax import nnx

    if dtype != "float32":
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(p.dtype)
                                       if jnp.issubdtype(p.dtype, jnp.floating) else p, params))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cold_start_places_items_like_add_items(tiny_run, item_features, monkeypatch, dtype):
    """POST /v1/items places items exactly as the library's add_items does with the served
    model: content-bridge voters, the decoder's beams for their pseudo-user, exposure-aware
    path choice. Same semantic IDs and embeddings as add_items on a copy of the model whose
    parameters are what the engine serves (bf16-rounded under serve.param_dtype=bfloat16;
    the engine then stores each new row in bf16), over two registrations (the second one
    builds on the first's items)."""
    from flax import nnx

    from genrec_jax.config import load_config, preset_path
    from genrec_jax.model.recommender import build_model
    from genrec_jax.semantic_ids import cold_start
    from genrec_jax.semantic_ids.train_rqvae import load_semantic_ids
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.inputs import Catalog

    from .conftest import FAST_COMPILE, SERVE_OVERRIDES

    sem = tiny_run / "semantic_ids"
    sid = load_semantic_ids(sem)
    n = sid.num_items
    cfg = load_config(preset_path("tiny"), [
        "model.decoder.enabled=true", "model.decoder.num_layers=1", "model.decoder.head_dim=8",
        "model.decoder.ffn_dim=32", "model.decoder.beam_width=8", *SERVE_OVERRIDES, f"serve.param_dtype={dtype}"])
    model = build_model(cfg.model, num_items=n, num_actions=5, max_len=cfg.data.max_seq_len, item_codes=sid.codes,
                        code_sizes=sid.code_sizes)
    for head in model.decoder.heads:  # sharper than a fresh init, so the decoder's rankings differ
        head.kernel[...] = head.kernel[...] * 8.0
    pop = (np.arange(n + 1) * 7) % 13
    pop[0] = 0
    reference = nnx.clone(model)
    _as_served(reference, dtype)
    catalog = Catalog(["<pad>"] + [f"i{i}" for i in range(1, n + 1)], ["view", "like", "share", "skip", "purchase"])
    engine = Engine(model, catalog, cfg.serve, semantic_dir=sem, warmup=False, compiler_options=FAST_COMPILE,
                    heads=("retrieval",), item_popularity=pop)
    probes = []
    ranking = cold_start.decoder_ranking
    monkeypatch.setattr(cold_start, "decoder_ranking", lambda *a, **k: probes.append(1) or ranking(*a, **k))

    lib = sid
    rounds = [[5, 9], [17, 40]]
    for r, rows in enumerate(rounds):
        x = np.stack([item_features[i] * (1.0 + 0.01 * r) for i in rows]).astype(np.float32)
        got = engine.add_items([{"item_id": f"new-{r}-{i}", "features": f.tolist()} for i, f in zip(rows, x)])
        assert len(probes) == 2 * r + 1, "the server must place items with the decoder's beams"
        res = cold_start.add_items(reference, lib, x, item_popularity=np.pad(pop, (0, len(lib.codes) - len(pop))))
        _as_served(reference, dtype)  # the engine stores the new rows in its dtype too
        lib = res.semantic_ids
        assert [g["semantic_id"] for g in got] == res.codes.tolist()
        np.testing.assert_array_equal(engine.semantic._sid.codes, lib.codes)
    params = jax.tree.unflatten(engine._fn.treedef, engine.weights)[0]
    served = np.asarray(params["item_emb"]["embedding"][...], np.float32)
    want = np.asarray(reference.item_emb.embedding[...], np.float32)
    assert engine.live_items == n + 4 and len(want) == n + 5
    np.testing.assert_array_equal(served[:n + 5], want)  # old rows unchanged, new ones as add_items made them

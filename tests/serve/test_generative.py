"""The semantic-ID side of serving: trie-constrained beam search (mode=generative) and
cold-start registration through the RQ-VAE."""

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

"""Property-based fuzzing of the request schema: no input makes the server answer 5xx.

Two layers: schemathesis generates requests from the app's own OpenAPI schema (types,
bounds, missing and extra fields, wrong media types); a hypothesis strategy builds
schema-valid requests over the catalogue's real ids, which reach the engine, and checks
the answers are well-formed."""

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from genrec_jax.serve.app import create_app


@pytest.fixture(scope="module")
def app(engine, serve_cfg):
    app = create_app(serve_cfg, engine)
    app.state.service.start()  # ready before the first generated request (lifespan start is then a no-op)
    yield app
    app.state.service.stop()


def test_schema_fuzz_finds_no_server_error(app):
    """Every operation of the OpenAPI schema, with schema-valid and schema-violating inputs.

    (Driven through hypothesis directly: schemathesis' pytest plugin does not support the
    pytest version in use.)"""
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/recommend", "POST /v1/rank", "POST /v1/items",
                                               "GET /v1/items", "GET /healthz", "GET /readyz", "GET /metrics"}
    for op in operations:
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, content_type_conformance])

        fuzz()


ITEMS = [f"i{i}" for i in range(1, 121)]
ACTIONS = ["view", "like", "share", "skip", "purchase"]
event = st.fixed_dictionaries({"item_id": st.sampled_from(ITEMS)},
                              optional={"action": st.sampled_from(ACTIONS + ["bogus"])})
request = st.fixed_dictionaries(
    {"history": st.lists(event, min_size=1, max_size=40)},
    optional={
        "user_id": st.sampled_from(["alice", "bob", "carol"]),
        "k": st.integers(1, 20),
        "exclude_history": st.booleans(),
        "exclude_items": st.lists(st.sampled_from(ITEMS), max_size=8),
        "context": st.fixed_dictionaries({}, optional={"timestamp": st.integers(0, 100)}),
    },
)


@given(req=request, data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_valid_requests_over_real_ids(app, req, data):
    from fastapi.testclient import TestClient

    stamps = data.draw(st.booleans())
    if stamps:  # timestamps on every event, sometimes out of order (a 422 then)
        ts = data.draw(st.lists(st.integers(0, 10**6), min_size=len(req["history"]), max_size=len(req["history"])))
        if data.draw(st.booleans()):
            ts = sorted(ts)
        for ev, t in zip(req["history"], ts):
            ev["timestamp"] = t
    app.state.service.start()  # no-op unless a test client's lifespan stopped it
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/v1/recommend", json=req)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["error"]["field"]
        return
    items = [it["item_id"] for it in r.json()["items"]]
    assert len(items) == req.get("k", 10) and len(set(items)) == len(items)
    banned = set(req.get("exclude_items", []))
    if req.get("exclude_history"):
        banned |= {ev["item_id"] for ev in req["history"]}
    assert not banned & set(items), "an excluded item was recommended"
    scores = [it["score"] for it in r.json()["items"]]
    assert np.all(np.diff(scores) <= 0), "items are not sorted by score"
    cands = data.draw(st.lists(st.sampled_from(ITEMS), min_size=1, max_size=40))
    r = client.post("/v1/rank", json={"history": req["history"], "candidates": cands})
    assert r.status_code == 200 and [it["item_id"] for it in r.json()["items"]] == cands

"""ipc.py: frames round-trip; bad or oversized frames are refused cleanly; answers reach
their own caller; engine errors keep their status and field; an engine that is gone or
silent gives 503 / 504 with a clear message, also through a front end's HTTP app."""

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genrec_jax.serve.errors import DeadlineExceeded, EngineUnavailable, RemoteError, RequestError
from genrec_jax.serve.ipc import HEADER, EngineClient, EngineServer, FrameError, encode_frame, read_frame

LIMIT = 4096


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


def test_frames_round_trip():
    async def go():
        objs = [{"id": 1, "op": "recommend", "args": {"history": [{"item_id": "i1"}], "k": 3}},
                {"id": 2, "result": {"items": [{"item_id": 7, "score": 0.1 + 0.2}]}}]
        r = reader_of(b"".join(encode_frame(o, LIMIT) for o in objs))
        got = [await read_frame(r, LIMIT), await read_frame(r, LIMIT)]
        return objs, got, await read_frame(r, LIMIT)

    objs, got, end = asyncio.run(go())
    assert got == objs, "a frame must decode to exactly what was sent (floats included)"
    assert end is None, "a connection closed between frames is a clean end"


BAD_FRAMES = [
    ("oversized", HEADER.pack(LIMIT + 1) + b"{}", "outside"),
    ("huge_length", HEADER.pack(2**32 - 1), "outside"),
    ("empty", HEADER.pack(0), "outside"),
    ("not_json", HEADER.pack(5) + b"{oops", "not JSON"),
    ("not_utf8", HEADER.pack(2) + b"\xff\xfe", "not JSON"),
    ("not_an_object", HEADER.pack(6) + b"[1, 2]", "not an object"),
    ("truncated_payload", HEADER.pack(10) + b'{"id"', "closed after 5 of 10"),
    ("truncated_header", b"\x00\x00", "header"),
]


@pytest.mark.parametrize("case", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_is_refused(case):
    _, data, why = case

    async def go():
        # No EOF after an oversized header: the limit must be enforced before waiting for
        # (or allocating) the payload.
        eof = not data.startswith((HEADER.pack(LIMIT + 1), HEADER.pack(2**32 - 1)))
        with pytest.raises(FrameError, match=why):
            await asyncio.wait_for(read_frame(reader_of(data, eof=eof), LIMIT), 2)

    asyncio.run(go())


def test_encoding_past_the_limit_is_refused():
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame({"x": "a" * LIMIT}, LIMIT)


class FakeService:
    """Answers after a delay taken from the request, echoing it; fails on request."""

    async def recommend(self, a):
        await asyncio.sleep(a.get("delay", 0))
        if a.get("fail") == "request":
            raise RequestError("history[0].item_id", "unknown item 'nope'")
        if a.get("fail") == "crash":
            raise RuntimeError("secret internal detail")
        return {"echo": a["n"]}

    rank = add_items = list_items = catalog_page = recommend

    async def readiness(self):
        return 200, {"status": "ready"}

    async def metrics_text(self):
        return b"genrec_queue_depth 0.0\n"


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="ipc-")  # short: Unix socket paths are limited to ~100 bytes
    yield str(Path(d) / "engine.sock")
    shutil.rmtree(d, ignore_errors=True)


def with_server(sock_path, scenario, service=None):
    async def go():
        server = await EngineServer(service or FakeService(), sock_path, LIMIT).start()
        client = EngineClient(sock_path, LIMIT)
        try:
            return await scenario(server, client)
        finally:
            await client.close()
            await server.close()

    return asyncio.run(go())


def test_concurrent_calls_get_their_own_answers(sock_path):
    async def scenario(server, client):
        # Later requests answer first: answers come back out of order on one connection.
        calls = [client.call("recommend", {"n": i, "delay": 0.002 * (20 - i)}, 5) for i in range(20)]
        return await asyncio.gather(*calls), server.connections

    answers, connections = with_server(sock_path, scenario)
    assert [a["echo"] for a in answers] == list(range(20)), "a caller received another caller's answer"
    assert connections == 1, "one connection carries a front end's concurrent requests"


def test_engine_errors_keep_status_and_field(sock_path):
    async def scenario(server, client):
        out = []
        for fail in ("request", "crash"):
            with pytest.raises(RemoteError) as e:
                await client.call("recommend", {"n": 0, "fail": fail}, 5)
            out.append(e.value)
        with pytest.raises(RemoteError) as e:
            await client.call("no_such_op", {}, 5)
        out.append(e.value)
        out.append(await client.call("ready", {}, 5))  # the connection survived the errors
        return out

    bad, crash, unknown, ready = with_server(sock_path, scenario)
    assert (bad.status, bad.kind, bad.field) == (422, "invalid_request", "history[0].item_id")
    assert bad.message.startswith("history[0].item_id")
    assert crash.status == 500 and crash.kind == "internal" and "reference" in crash.message
    assert "secret" not in crash.message, "an engine-side exception's text must not reach the client"
    assert unknown.status == 400 and "no_such_op" in unknown.message
    assert ready == {"status": 200, "body": {"status": "ready"}}


def test_server_drops_a_connection_sending_bad_frames_and_keeps_serving(sock_path):
    async def scenario(server, client):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(HEADER.pack(LIMIT * 100) + b"x" * 64)
        closed = await asyncio.wait_for(reader.read(), 2) == b""  # EOF: the server hung up
        writer.close()
        return closed, await client.call("recommend", {"n": 5}, 5)

    closed, answer = with_server(sock_path, scenario)
    assert closed and answer == {"echo": 5}


def test_engine_gone_or_silent(sock_path):
    async def missing():
        with pytest.raises(EngineUnavailable, match="not reachable"):
            await EngineClient(sock_path, LIMIT).call("recommend", {}, 1)

    asyncio.run(missing())

    async def silent(server, client):
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="did not answer within 200 ms"):
            await client.call("recommend", {"n": 0, "delay": 5}, 0.2)
        waited = time.perf_counter() - t0
        pending = asyncio.ensure_future(client.call("recommend", {"n": 1, "delay": 5}, 5))
        await asyncio.sleep(0.05)
        await server.close()  # the engine goes away while a request waits
        for t in list(server._tasks):
            t.cancel()
        client._writer.transport.abort()
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(pending, 2)
        return waited

    assert with_server(sock_path, silent) < 0.5


def test_front_end_without_engine_answers_503(sock_path):
    from genrec_jax.config import ServeConfig
    from genrec_jax.serve.frontend import create_frontend_app

    app = create_frontend_app(ServeConfig(), EngineClient(sock_path, LIMIT))  # nothing listens there
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        t0 = time.perf_counter()
        r = c.post("/v1/recommend", json={"history": [{"item_id": "i1"}]})
        assert r.status_code == 503 and time.perf_counter() - t0 < 2
        err = r.json()["error"]
        assert err["type"] == "engine_unavailable" and "engine process" in err["message"]
        assert r.headers.get("retry-after")
        r = c.post("/v1/recommend", json={"history": [{"item_id": "i1"}], "k": "3"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "k", "validation happens in the front end"
        assert "genrec_errors_total" in c.get("/metrics").text


def test_model_requests_report_their_round_trip_and_engine_time(sock_path):
    """The hooks behind genrec_engine_roundtrip_seconds (front end) and
    genrec_engine_request_seconds (engine process): one observation per answered model
    request (an error reply included), the engine's time inside the round trip, none for
    control calls."""
    seen = {"engine": [], "roundtrip": []}

    async def go():
        server = await EngineServer(FakeService(), sock_path, LIMIT,
                                    on_request=lambda op, s: seen["engine"].append((op, s))).start()
        client = EngineClient(sock_path, LIMIT, on_roundtrip=lambda op, s: seen["roundtrip"].append((op, s)))
        try:
            await client.call("recommend", {"n": 1, "delay": 0.03}, 5)
            await client.call("ready", {}, 5)
            with pytest.raises(RemoteError):
                await client.call("recommend", {"n": 0, "fail": "request"}, 5)
        finally:
            await client.close()
            await server.close()

    asyncio.run(go())
    assert [op for op, _ in seen["engine"]] == ["recommend", "recommend"], "control calls are not model requests"
    assert [op for op, _ in seen["roundtrip"]] == ["recommend", "recommend"], "an error reply is an answer too"
    engine_s, roundtrip_s = seen["engine"][0][1], seen["roundtrip"][0][1]
    assert 0.03 <= engine_s <= roundtrip_s < 5, (engine_s, roundtrip_s)

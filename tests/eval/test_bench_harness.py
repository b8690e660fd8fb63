"""The measuring parts of two benchmarks: serve_load's open-loop schedule spread over
several generator processes, and the pooled cold-start rate's interval."""

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import serve_load  # noqa: E402
from bench.semantic_ids import wilson_interval  # noqa: E402


class _Handler(BaseHTTPRequestHandler):
    """Answers POSTs whose body says {"n": even} with 200, odd with 503 (a refusal)."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body["n"])
        status = 200 if body["n"] % 2 == 0 else 503
        payload = json.dumps({"items": []} if status == 200 else {"error": {"type": "busy"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # /metrics: one latency bucket
        payload = b'genrec_request_latency_seconds_bucket{path="/v1/recommend",le="+Inf"} 0\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class _Work:
    def __init__(self):
        self.n = 0

    def body(self):
        self.n += 1
        return {"n": self.n}


@pytest.mark.parametrize("procs", [1, 3])
def test_every_scheduled_request_is_sent_once_and_counted(procs):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Handler.seen = []
    try:
        args = serve_load.parse_args(["--url", f"http://127.0.0.1:{server.server_port}", "--duration", "0.5",
                                      "--procs", str(procs), "--timeout", "5"])
        client = serve_load.RawClient(f"http://127.0.0.1:{server.server_port}", 8)
        row = asyncio.run(serve_load.run_rate(client, 60.0, args, _Work()))
    finally:
        server.shutdown()
    assert row["sent"] == 30 and row["generator_dropped"] == 0 and row["generator_procs"] == procs
    assert sorted(_Handler.seen) == list(range(1, 31))  # each body once, whichever process sent it
    assert row["ok"] == 15 and row["status_503"] == 15 and row["other_errors"] == 0
    assert row["error_kinds"] == {"busy": 15}
    assert row["p50_ms"] > 0 and np.isfinite(row["p99_ms"])
    assert 0.3 < row["send_seconds"] < 2.0  # the 30 sends were spread over the half second, not bunched


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(484, 500)
    assert lo < 484 / 500 < hi and lo == pytest.approx(0.9487, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(0.0)


def test_server_stage_quantiles_from_two_scrapes():
    """serve_load's server-side columns: the p99 of each histogram between two /metrics
    scrapes, as the upper bound of the bucket that holds it; other endpoints' latency
    series (here /healthz) are left out."""
    def text(lat, wait, batch):
        lines = []
        for le, c in lat:
            lines.append(f'genrec_request_latency_seconds_bucket{{endpoint="/v1/recommend",le="{le}"}} {c}')
            lines.append(f'genrec_request_latency_seconds_bucket{{endpoint="/healthz",le="{le}"}} 1000')
        lines += [f'genrec_request_queue_wait_seconds_bucket{{le="{le}"}} {c}' for le, c in wait]
        lines += [f'genrec_queue_wait_seconds_bucket{{le="{le}"}} 999' for le, _ in wait]  # per batch: not read
        lines += [f'genrec_batch_seconds_bucket{{le="{le}"}} {c}' for le, c in batch]
        for name in ("genrec_engine_roundtrip_seconds_bucket", "genrec_engine_request_seconds_bucket"):
            lines += [f'{name}{{op="recommend",le="{le}"}} {c}' for le, c in batch]  # the same counts
            lines += [f'{name}{{op="rank",le="{le}"}} {c}' for le, c in batch]  # added to them
        return "\n".join(lines)

    before = serve_load.parse_histograms(text([(0.01, 5), (0.05, 5), ("+Inf", 5)], [(0.002, 3), ("+Inf", 3)],
                                              [(0.01, 2), (0.05, 2), ("+Inf", 2)]))
    after = serve_load.parse_histograms(text([(0.01, 104), (0.05, 105), ("+Inf", 105)],
                                             [(0.002, 53), ("+Inf", 53)],
                                             [(0.01, 2), (0.05, 101), ("+Inf", 102)]))
    assert serve_load.server_quantile(before, after, 0.99) == pytest.approx(10.0)  # 99 of 100 under 10 ms
    assert serve_load.server_quantile(before, after, 0.99, "queue_wait") == pytest.approx(2.0)
    assert serve_load.server_quantile(before, after, 0.50, "batch") == pytest.approx(50.0)
    assert serve_load.server_quantile(before, after, 0.999, "batch") == float("inf")  # past the last bound
    assert serve_load.server_quantile(before, before, 0.99, "batch") is None  # nothing in between
    for key in ("roundtrip", "engine"):  # two op series summed: 200 observations, 2 of them under 10 ms
        assert serve_load.server_quantile(before, after, 0.50, key) == pytest.approx(50.0)
        assert after[key][0.01] == 4 and after[key][0.05] == 202


def test_raw_client_resends_once_when_the_server_closed_an_idle_connection():
    """A kept-alive connection the server dropped while idle (its keep-alive timeout) fails
    before any byte of an answer: the request goes again on a new connection. A connection
    that breaks in the middle of an answer is an error, not retried."""
    served = []

    async def main():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            length = 2
            await reader.readexactly(length)
            served.append(1)
            if len(served) == 3:  # the third answer breaks off after its head
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # keep-alive ends after one answer, without saying so

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = serve_load.RawClient(f"http://127.0.0.1:{port}", 4)
        try:
            first = await client.post("/v1/recommend", b"{}", 5)
            await asyncio.sleep(0.05)  # the server has closed the idle connection by now
            second = await client.post("/v1/recommend", b"{}", 5)  # reused, dead: sent again
            with pytest.raises(asyncio.IncompleteReadError):
                await client.post("/v1/recommend", b"{}", 5)  # reused, dead, resent, broken mid-answer
        finally:
            client.close()
            server.close()
            await server.wait_closed()
        return first, second

    first, second = asyncio.run(main())
    assert first == (200, b"ok") and second == (200, b"ok")
    assert len(served) == 3

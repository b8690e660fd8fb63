#!/usr/bin/env python
"""Open-loop HTTP load against ``serve.py`` on 127.0.0.1: rate, latency, errors, saturation.

For each offered rate R (requests/s) the generator sends requests at fixed intervals 1/R
for --duration seconds (at most --max-requests), whether or not earlier ones answered --
open loop, so a slow server faces a growing backlog instead of a politely waiting client.
Per rate it reports the achieved rate (200s per second), p50 / p95 / p99 latency of the
admitted (200) requests as the client sees them, the server's own p99 (from /metrics,
bucket upper bound) and, from the engine's histograms, the p99 of the requests' wait in
the batcher queue ("wait p99") and of the batches' execution ("batch p99", dispatch to
answers, per batch); with front ends split off (--workers), also the p99 of a request's
round trip from a front end to the engine process ("rt p99") and of its time inside the
engine process, frame read to answer written ("eng p99"); every error by status, and how
late the generator fell behind its schedule ("gen lag": when large, the client machine,
not the server, is saturated). Past
saturation the server should refuse with fast 503s (bounded queue, bounded in-flight
requests) while admitted requests keep a bounded latency.

The server is started as a subprocess (``python serve.py --checkpoint DIR``) unless --url
points at a running one; --server-arg passes serve.py flags through, e.g.
``--server-arg='--workers 4'`` for the multi-process server (four HTTP front-end processes
and one engine process; stopping the server's process group stops all of them). Bounded in
count and time: --max-requests per rate, --duration, and --timeout per request.

Examples:
    python bench/serve_load.py --checkpoint runs/synthetic --rates 100,500,1000,2000,4000
    python bench/serve_load.py --checkpoint /tmp/tiny --rates 25,50,100,200,400 --duration 4 \\
        --set serve.queue_size=32 --json /tmp/serve_load.jsonl          # CPU run
    python bench/serve_load.py --checkpoint runs/synthetic --rates 1000,2000,4000 --procs 4 \\
        --server-arg='--workers 4'                                       # HTTP front ends split off
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import pyplot, write_rows  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="run directory to serve (starts serve.py)")
    p.add_argument("--url", default=None, help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="serve.* override for serve.py")
    p.add_argument("--server-arg", dest="server_args", action="append", default=[],
                   help="extra serve.py argument(s), e.g. --server-arg='--limit-concurrency 10000' (repeatable)")
    p.add_argument("--rates", default="50,100,200,400,800", help="offered requests/s, one phase each")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    p.add_argument("--max-requests", type=int, default=5000, help="cap per rate")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load at --warmup-rate before the first phase, not reported (0: none)")
    p.add_argument("--warmup-rate", type=float, default=200.0)
    p.add_argument("--endpoint", choices=["recommend", "rank"], default="recommend")
    p.add_argument("--mode", choices=["retrieval", "generative"], default="retrieval")
    p.add_argument("--history-len", type=int, default=32)
    p.add_argument("--candidates", type=int, default=100, help="rank: candidates per request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--returning", type=float, default=0.0,
                   help="fraction of requests from returning users (+1 event each; exercises the prefix cache)")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    p.add_argument("--max-inflight", type=int, default=2000, help="generator-side cap on open requests")
    p.add_argument("--procs", type=int, default=1,
                   help="generator processes per phase (round robin over the schedule): one Python process "
                        "cannot send and time much more than ~1,000-2,000 requests/s itself")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(f"/tmp/serve_load_server_{port}.log")
    cmd = [sys.executable, str(REPO / "serve.py"), "--checkpoint", args.checkpoint, "--port", str(port),
           "--log-level", "warning"]
    for o in args.overrides:
        cmd += ["--set", o]
    for a in args.server_args:
        cmd += a.split()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(url: str, proc, timeout: float, log: Path | None, *, poll_s: float = 0.5,
               error: type[BaseException] = SystemExit) -> dict:
    """Poll ``url``/readyz until it answers 200 (its JSON body is returned); raise ``error``
    if ``proc`` exits first or ``timeout`` seconds pass (the tests pass AssertionError)."""
    import httpx  # only to poll /readyz

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise error(f"serve.py exited ({proc.returncode}); its log: {log}\n" + (log.read_text()[-3000:] if log
                                                                                     else ""))
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise error(f"server not ready after {timeout}s (log: {log})")


def stop_server(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the process group we started (serve.py and nothing else)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# --------------------------------------------------------------------------- load


class Workload:
    """Request bodies over the server's real catalogue; returning users extend their history."""

    def __init__(self, items: list[str], args):
        self.items, self.args = items, args
        self.rng = np.random.default_rng(args.seed)
        self.users: dict[str, list[dict]] = {}
        self.n = 0

    def _events(self, n, t0):
        ids = self.rng.choice(self.items, n)
        return [{"item_id": str(x), "timestamp": int(t0 + 60 * i)} for i, x in enumerate(ids)]

    def body(self) -> dict:
        a = self.args
        self.n += 1
        if a.returning > 0 and self.users and self.rng.random() < a.returning:
            uid = self.rng.choice(list(self.users))
            hist = self.users[uid]
            hist = hist + self._events(1, hist[-1]["timestamp"] + 60)
            hist = hist[-a.history_len:]  # a full window slides: the server then recomputes it
            self.users[uid] = hist
        else:
            uid = f"user{self.n}"
            hist = self._events(max(1, a.history_len - 4), 1_700_000_000)
            if a.returning > 0:
                self.users[uid] = hist
        body = {"history": hist, "user_id": uid}
        if a.endpoint == "rank":
            body["candidates"] = [str(x) for x in self.rng.choice(self.items, a.candidates)]
        else:
            body.update(k=a.k, mode=a.mode)
        return body


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a pool of connections, one
    request in flight per connection. Far less CPU per request than a general client, so
    on a small machine the generator, not the server, is less often the bottleneck."""

    def __init__(self, url: str, max_connections: int):
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.max_connections = max_connections
        self.idle: list[tuple] = []
        self.open = 0

    async def _conn(self, fresh: bool = False):
        if self.idle and not fresh:
            return self.idle.pop(), True
        self.open += 1
        return await asyncio.open_connection(self.host, self.port), False

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """One request. A kept-alive connection that the server closed while it sat idle
        (its keep-alive timeout) fails before any byte of an answer comes back; that request
        is sent again, once, on a new connection, as HTTP clients do, instead of being
        counted as a server error."""
        conn, reused = await self._conn()
        try:
            return await self._exchange(conn, path, body, timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
            if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                raise
        conn, _ = await self._conn(fresh=True)
        return await self._exchange(conn, path, body, timeout)

    async def _exchange(self, conn, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            payload = await asyncio.wait_for(reader.readexactly(length), timeout)
        except BaseException:
            writer.close()
            self.open -= 1
            raise
        if close:
            writer.close()
            self.open -= 1
        else:
            self.idle.append(conn)
        return status, payload

    async def get_json(self, path: str) -> dict:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def close(self):
        for _, w in self.idle:
            w.close()


# /metrics histograms read at each phase's start and end: the front ends' request latency (the
# /v1/ endpoints), the engine's queue wait (per request) and batch time (per batch, dispatch
# to answers). Their difference says where an admitted request's time went.
HISTOGRAMS = {"latency": "genrec_request_latency_seconds_bucket",
              "queue_wait": "genrec_request_queue_wait_seconds_bucket", "batch": "genrec_batch_seconds_bucket",
              "roundtrip": "genrec_engine_roundtrip_seconds_bucket", "engine": "genrec_engine_request_seconds_bucket"}


async def server_counts(client: RawClient) -> dict:
    """Server-side view from /metrics: the histograms of ``HISTOGRAMS`` (retried: an
    overloaded server may refuse the scrape itself)."""
    text = ""
    for _ in range(50):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {client.host}\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        if raw.startswith(b"HTTP/1.1 200"):
            text = raw.split(b"\r\n\r\n", 1)[1].decode()
            break
        await asyncio.sleep(0.2)
    return parse_histograms(text)


def parse_histograms(text: str) -> dict:
    """Cumulative bucket counts ``{key: {le: count}}`` of ``HISTOGRAMS`` in a /metrics text
    (series of one name with different labels are added up)."""
    out: dict = {key: {} for key in HISTOGRAMS}
    for line in text.splitlines():
        for key, name in HISTOGRAMS.items():
            if line.startswith(name) and (key != "latency" or "/v1/" in line):
                le = float(line.split('le="')[1].split('"')[0].replace("+Inf", "inf"))
                out[key][le] = out[key].get(le, 0.0) + float(line.split()[-1])
    return out


def server_quantile(before: dict, after: dict, q: float, key: str = "latency") -> float | None:
    """q-quantile (ms, bucket upper bound) of server-side histogram ``key`` between two scrapes."""
    les = sorted(after[key])
    counts = [after[key][le] - before[key].get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    for le, c in zip(les, counts):
        if c >= q * total:
            return le * 1e3
    return None


def _per_process_cap(args) -> int:
    """Each generator process's share of --max-inflight."""
    return max(1, args.max_inflight // max(1, args.procs))


async def send_schedule(client: RawClient, path: str, bodies: list[bytes], times: list[float], args) -> dict:
    """Send ``bodies[i]`` at wall-clock time ``times[i]`` (``time.time()``), whether or not
    earlier ones answered; returns the records (status, latency s, error kind), how late the
    sender fell behind its schedule and what the generator-side cap dropped."""
    records: list[tuple[int, float, str]] = []
    inflight = 0
    dropped = 0
    cap = _per_process_cap(args)

    async def one(body):
        nonlocal inflight
        t0 = time.perf_counter()
        try:
            status, payload = await client.post(path, body, args.timeout)
            kind = ""
            if status != 200:
                try:
                    kind = json.loads(payload).get("error", {}).get("type", "")
                except ValueError:
                    kind = payload[:40].decode("latin-1")
            records.append((status, time.perf_counter() - t0, kind))
        except Exception as e:  # noqa: BLE001 -- a client-side failure is a result too
            records.append((0, time.perf_counter() - t0, type(e).__name__))
        finally:
            inflight -= 1

    tasks = []
    late = 0.0
    for body, at in zip(bodies, times):
        delay = at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        if inflight >= cap:
            dropped += 1
            continue
        inflight += 1
        tasks.append(asyncio.create_task(one(body)))
    sent_at = time.time()
    await asyncio.gather(*tasks)
    return {"records": records, "late": late, "dropped": dropped, "sent": len(tasks), "sent_at": sent_at,
            "done_at": time.time()}


def _send_in_process(url: str, path: str, bodies: list[bytes], times: list[float], args) -> dict:
    """One generator process's share of a phase (its own event loop and connections)."""
    async def go():
        client = RawClient(url, _per_process_cap(args))
        try:
            return await send_schedule(client, path, bodies, times, args)
        finally:
            client.close()

    return asyncio.run(go())


def _send_spread(url: str, path: str, bodies: list[bytes], times: list[float], args) -> list[dict]:
    """The phase split over ``args.procs`` generator processes, round robin, so their merged
    send times keep the 1/rate spacing. Spawned, not forked: this process has threads."""
    import multiprocessing as mp

    n = args.procs
    with mp.get_context("spawn").Pool(n) as pool:
        return pool.starmap(_send_in_process, [(url, path, bodies[i::n], times[i::n], args) for i in range(n)])


async def run_rate(client: RawClient, rate: float, args, work: Workload) -> dict:
    n = int(min(args.max_requests, max(1, rate * args.duration)))
    bodies = [json.dumps(work.body()).encode() for _ in range(n)]  # built before the clock starts
    path = f"/v1/{args.endpoint}"
    before = await server_counts(client)
    lead = 2.0 if args.procs > 1 else 0.05  # time for the generator processes to start (spawned)
    start = time.time() + lead
    times = [start + i / rate for i in range(n)]
    if args.procs > 1:
        url = f"http://{client.host}:{client.port}"
        parts = await asyncio.get_running_loop().run_in_executor(None, _send_spread, url, path, bodies, times, args)
    else:
        parts = [await send_schedule(client, path, bodies, times, args)]
    records = [r for part in parts for r in part["records"]]
    late = max(part["late"] for part in parts)
    dropped = sum(part["dropped"] for part in parts)
    send_s = max(part["sent_at"] for part in parts) - start
    wall = max(part["done_at"] for part in parts) - start
    after = await server_counts(client)
    ok = [lat for s, lat, _ in records if s == 200]
    refused = [lat for s, lat, _ in records if s == 503]
    return {
        "offered_rps": rate, "sent": sum(part["sent"] for part in parts), "send_seconds": round(send_s, 3),
        "generator_procs": args.procs, "generator_max_lag_ms": round(late * 1e3, 1),
        "achieved_rps": len(ok) / wall, "ok": len(ok),
        "p50_ms": pct(ok, 50), "p95_ms": pct(ok, 95), "p99_ms": pct(ok, 99),
        "server_p99_ms": server_quantile(before, after, 0.99),
        "server_queue_wait_p99_ms": server_quantile(before, after, 0.99, "queue_wait"),
        "server_batch_p99_ms": server_quantile(before, after, 0.99, "batch"),
        "server_batch_p50_ms": server_quantile(before, after, 0.50, "batch"),
        "server_roundtrip_p99_ms": server_quantile(before, after, 0.99, "roundtrip"),
        "server_engine_p99_ms": server_quantile(before, after, 0.99, "engine"),
        "status_503": len(refused), "p50_503_ms": pct(refused, 50), "p99_503_ms": pct(refused, 99),
        "status_504": sum(s == 504 for s, _, _ in records),
        "other_errors": sum(s not in (200, 503, 504) for s, _, _ in records),
        "generator_dropped": dropped,
        "error_kinds": dict(sorted(collections.Counter(k for s, _, k in records if s != 200).items())),
        "statuses": {str(k): v for k, v in sorted(collections.Counter(s for s, _, _ in records).items())},
    }


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else None


async def run_all(url: str, args) -> list[dict]:
    client = RawClient(url, args.max_inflight)
    try:
        page = await client.get_json("/v1/items?limit=1000")
        work = Workload([it["item_id"] for it in page["items"]], args)
        for _ in range(20):  # warm a connection and the server
            await client.post(f"/v1/{args.endpoint}", json.dumps(work.body()).encode(), args.timeout)
        if args.warmup > 0:  # every front end and generator connection sees traffic before the first phase
            warm = await run_rate(client, args.warmup_rate, argparse.Namespace(**{**vars(args), "duration": args.warmup}),
                                  work)
            print(f"# warm-up, not reported: {args.warmup:g}s at {args.warmup_rate:g}/s, {warm['achieved_rps']:.0f}/s "
                  f"answered, p99 {warm['p99_ms'] or float('nan'):.1f} ms")
            await asyncio.sleep(1.0)
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            row = await run_rate(client, rate, args, work)
            rows.append(row)
            print_row(row)
            await asyncio.sleep(1.0)  # let the queue drain between phases
        return rows
    finally:
        client.close()


HEADER = (f"{'offered/s':>10}{'sent':>7}{'achieved/s':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'srv p99':>9}{'rt p99':>8}{'eng p99':>9}{'wait p99':>9}{'batch p99':>10}{'503':>7}{'503 p99':>9}"
          f"{'504':>6}{'other':>7}"
          f"{'gen lag':>9}  errors by type")


def fmt(x, w, d=1):
    return f"{x:>{w}.{d}f}" if x is not None else f"{'-':>{w}}"


def print_row(r):
    if not getattr(print_row, "done", False):
        print(HEADER)
        print("-" * len(HEADER))
        print_row.done = True
    print(f"{r['offered_rps']:>10.0f}{r['sent']:>7}{r['achieved_rps']:>12.1f}{fmt(r['p50_ms'], 9)}"
          f"{fmt(r['p95_ms'], 9)}{fmt(r['p99_ms'], 9)}{fmt(r['server_p99_ms'], 9)}"
          f"{fmt(r.get('server_roundtrip_p99_ms'), 8)}{fmt(r.get('server_engine_p99_ms'), 9)}"
          f"{fmt(r.get('server_queue_wait_p99_ms'), 9)}{fmt(r.get('server_batch_p99_ms'), 10)}{r['status_503']:>7}"
          f"{fmt(r['p99_503_ms'], 9)}{r['status_504']:>6}{r['other_errors'] + r['generator_dropped']:>7}"
          f"{r['generator_max_lag_ms']:>9.0f}  {' '.join(f'{k}:{v}' for k, v in r['error_kinds'].items())}",
          flush=True)


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    x = [r["offered_rps"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        a1.plot(x, [r[key] for r in rows], "o-", label=key)
    a1.set_xlabel("offered load (req/s)")
    a1.set_ylabel("latency of admitted requests (ms)")
    a1.legend()
    a2.plot(x, [r["achieved_rps"] for r in rows], "o-", label="achieved (200/s)")
    a2.plot(x, [r["status_503"] / max(r["send_seconds"], 1e-9) for r in rows], "s-", label="refused (503/s)")
    a2.plot(x, x, "k--", alpha=0.3, label="offered")
    a2.set_xlabel("offered load (req/s)")
    a2.legend()
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.url and not args.checkpoint:
        print("give --checkpoint DIR (a run from `python train.py`, e.g. `python train.py --config configs/tiny.yaml "
              "--out /tmp/tiny`) or --url of a running server", file=sys.stderr)
        return 2
    proc = log = None
    url = args.url
    try:
        if url is None:
            proc, url, log = start_server(args)
        info = wait_ready(url, proc, args.startup_timeout, log)
        print(f"# serve_load: {url} model {info.get('model_version')}, endpoint {args.endpoint}"
              f"{'/' + args.mode if args.endpoint == 'recommend' else ''}, history {args.history_len}, "
              f"{args.duration:g}s per rate (<= {args.max_requests} requests), returning {args.returning:.0%}")
        rows = asyncio.run(run_all(url, args))
    finally:
        stop_server(proc)
    write_rows(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

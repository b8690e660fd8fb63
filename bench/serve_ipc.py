#!/usr/bin/env python
"""The engine process of the multi-process server, driven through its front-end socket.

    python bench/serve_ipc.py --checkpoint RUN [--seconds 5] [--frontends 4] [--concurrency 64]
        [--real] [--history-len 32] [--json rows.jsonl]

``serve.py --workers N`` runs N HTTP front ends and one engine process; the front ends
forward each validated request over a Unix socket (``genrec_jax.serve.ipc``), and the
engine process decodes it, turns it into a job, batches it and answers. This script starts
that engine side alone (``ipc.EngineServer`` over ``app.Service``, as the server builds it)
in a child process and drives it from this one with ``--frontends`` socket clients, each
keeping ``--concurrency`` retrieval requests (``--history-len`` events, k=10) in flight,
closed loop, for ``--seconds``. No HTTP is involved: the result is the most the engine
process can answer per second through the socket, and its CPU time per request.

By default the model's batch step is replaced by a stub that returns one cached answer
per job after ``--stub-ms`` (standing in for the device), so what is measured is the
engine process's own Python work: frame decoding, job building, batching, the hand-off
between the batcher thread and the event loop, answers. ``--real`` keeps the model.

One row per run: answered requests/s, client-side p50 / p99 ms, the engine process's CPU
seconds (user + system, every thread) per answered request, and the mean batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_rows  # noqa: E402

BUCKETS = ["serve.batch_buckets=[64]", "serve.seq_buckets=[64]"]
# Room in the queue for every request in flight (the default 64 would refuse most of them).
OVERRIDES = ["serve.max_loop_lag_ms=0", "serve.queue_size=512"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (python train.py --out DIR)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--frontends", type=int, default=4, help="socket connections, as N front ends open")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight per connection")
    p.add_argument("--history-len", type=int, default=32)
    p.add_argument("--real", action="store_true", help="run the model instead of the stub")
    p.add_argument("--stub-ms", type=float, default=0.5, help="the stub's time per batch")
    p.add_argument("--users", choices=["none", "new", "returning"], default="none",
                   help="user ids on the requests: none (anonymous: the fused encode + top-k step), new (a fresh "
                        "id each: prefill into the K/V slot pool, then top-k), returning (ids reused from a pool "
                        "of --user-pool, each request one event longer: the prefix-cache extend path)")
    p.add_argument("--user-pool", type=int, default=2000, help="distinct users with --users returning")
    p.add_argument("--no-resolve", dest="resolve", action="store_false",
                   help="send histories as clients write them (serve.resolve_in_frontends=false) instead of "
                        "packed internal ids resolved here, as the HTTP front ends do by default")
    p.add_argument("--server-buckets", action="store_true",
                   help="keep the checkpoint's buckets (as serve.py does) instead of one 64 x 64 bucket")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="serve.* override")
    p.add_argument("--json", default=None)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child: the engine side on this socket
    return p.parse_args(argv)


def history(catalog_ids: list[str], n: int, first: int = 0) -> list[dict]:
    return [{"item_id": catalog_ids[1 + i % (len(catalog_ids) - 1)], "action": None,
             "timestamp": 1_700_000_000 + 60 * i} for i in range(first, first + n)]


class Users:
    """Request bodies per ``--users``: anonymous, a new id each, or ids drawn in turn from a
    pool whose histories grow by one event per request (a window past the model's length
    slides, which the engine treats as a miss)."""

    def __init__(self, ids: list[str], args):
        self.ids, self.args = ids, args
        self.n = 0
        self.state: dict[str, tuple[int, int]] = {}  # user -> (first event, events)

    def body(self) -> dict:
        a = self.args
        self.n += 1
        uid, first, n = None, 0, a.history_len
        if a.users == "new":
            uid = f"u{self.n}"
        elif a.users == "returning":
            uid = f"u{self.n % a.user_pool}"
            first, n = self.state.get(uid, (self.n, max(1, a.history_len - 8)))
            n += 1
            if n > a.history_len:  # start this user over: a new, shorter history
                first, n = self.n, max(1, a.history_len - 8)
            self.state[uid] = (first, n)
        return {"history": history(self.ids, n, first), "k": 10, "mode": "retrieval", "context": None,
                "exclude_history": False, "exclude_items": [], "user_id": uid, "timeout_ms": 5000}


def thread_cpu() -> tuple[float, float]:
    """(CPU seconds of this process's Python threads, of its other threads): the first run
    under one GIL, so their sum near one core means the process is bound by it."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    python = {t.native_id for t in threading.enumerate()}
    py = other = 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) in python:
            py += cpu
        else:
            other += cpu
    return py, other


def serve(args) -> None:
    """Child process: build the engine, start the socket server, print READY, and on
    stdin's end print the CPU seconds used since READY."""
    from genrec_jax.serve.app import Service
    from genrec_jax.serve.cli import serve_config
    from genrec_jax.serve.engine import Engine
    from genrec_jax.serve.ipc import EngineServer, frame_limit
    from genrec_jax.serve.metrics import EngineMetrics

    run = Path(args.checkpoint)
    ov = ([] if args.server_buckets else BUCKETS) + OVERRIDES + args.overrides
    cfg = serve_config(run, ov)
    engine = Engine.from_checkpoint(run, ov)
    engine.warmup()
    if not args.real:
        ids = json.loads((run / "items.json").read_text())
        answer = engine.process([engine.recommend_job(history(ids, args.history_len), k=10)])[0]

        def stub(jobs):
            time.sleep(args.stub_ms / 1e3)
            return [answer] * len(jobs)

        engine.process = stub
        engine.dispatch = stub  # the pipelined batcher's two halves: the stub's answers pass through
        engine.collect = lambda answers: answers
    svc = Service(cfg, lambda: engine, EngineMetrics())
    svc.start()

    async def main():
        server = await EngineServer(svc, args.serve, frame_limit(cfg)).start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        py0, other0 = thread_cpu()
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        py1, other1 = thread_cpu()
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        stats = engine.stats() if args.real else {}
        print(json.dumps({"cpu_s": cpu, "python_cpu_s": py1 - py0, "other_cpu_s": other1 - other0,
                          "batches": svc.batcher.batches, "hits": stats.get("prefix_cache_hits", 0),
                          "misses": stats.get("prefix_cache_misses", 0)}), flush=True)
        await server.close()
        svc.stop()

    asyncio.run(main())


async def drive(args, sock: str) -> dict:
    from genrec_jax.serve.cli import serve_config
    from genrec_jax.serve.frontend import RemoteEngine
    from genrec_jax.serve.ipc import EngineClient
    from genrec_jax.serve.metrics import RequestMetrics

    ids = json.loads((Path(args.checkpoint) / "items.json").read_text())
    users = Users(ids, args)
    clients = [EngineClient(sock, 1 << 22) for _ in range(args.frontends)]
    # What a front end does before forwarding: resolve the history with its catalogue copy.
    remote = RemoteEngine(serve_config(Path(args.checkpoint), args.overrides), clients[0], RequestMetrics())
    if args.resolve:
        await remote.load_catalog()
        if remote.catalog is None:
            raise RuntimeError("the engine side gave no catalogue")
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + args.seconds

    async def worker(c):
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                await c.call("recommend", remote.resolve(users.body()), 5.0)
            except Exception:  # noqa: BLE001 -- counted; the row says how many
                errors += 1
                continue
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in clients for _ in range(args.concurrency)])
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.close()
    lat.sort()
    q = lambda f: 1e3 * lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"answered": len(lat), "errors": errors, "seconds": elapsed, "rate": len(lat) / elapsed,
            "p50_ms": q(0.5), "p99_ms": q(0.99)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="genrec-ipc-") as tmp:
        sock = os.path.join(tmp, "engine.sock")
        child_args = ["--checkpoint", args.checkpoint, "--history-len", str(args.history_len),
                      "--stub-ms", str(args.stub_ms), *(["--real"] if args.real else []),
                      *(["--server-buckets"] if args.server_buckets else []),
                      *[x for o in args.overrides for x in ("--set", o)]]
        child = subprocess.Popen([sys.executable, __file__, *child_args, "--serve", sock], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        if line.strip() != "READY":
            child.kill()
            print(f"serve_ipc: the engine side did not start (said {line!r}); run with a trained checkpoint "
                  "(python train.py --out DIR)", file=sys.stderr)
            return 1
        res = asyncio.run(drive(args, sock))
        out, _ = child.communicate("", timeout=60)
        usage = json.loads(out.strip().splitlines()[-1])
    per = 1e6 / max(res["answered"], 1)
    row = {"bench": "serve_ipc", "model": "real" if args.real else f"stub {args.stub_ms:g} ms",
           "users": args.users, "resolved": args.resolve, "buckets": "server" if args.server_buckets else "64x64",
           "frontends": args.frontends, "concurrency": args.concurrency, "history_len": args.history_len, **res,
           "engine_cpu_us_per_request": per * usage["cpu_s"],
           "python_threads_cpu_us_per_request": per * usage["python_cpu_s"],
           "python_threads_cores": usage["python_cpu_s"] / res["seconds"],
           "other_threads_cpu_us_per_request": per * usage["other_cpu_s"],
           "prefix_hits": usage["hits"], "prefix_misses": usage["misses"],
           "mean_batch": res["answered"] / max(usage["batches"], 1)}
    print(f"{'model':>12} {'users':>9} {'conns':>5} {'in flight':>9} {'answered/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU us/req':>10} {'py us/req':>9} {'py cores':>8} {'batch':>6} {'errors':>6}")
    print(f"{row['model']:>12} {row['users']:>9} {row['frontends']:>5} {row['frontends'] * row['concurrency']:>9} "
          f"{row['rate']:>11.0f} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} {row['engine_cpu_us_per_request']:>10.1f} "
          f"{row['python_threads_cpu_us_per_request']:>9.1f} {row['python_threads_cores']:>8.2f} "
          f"{row['mean_batch']:>6.1f} {row['errors']:>6}")
    write_rows(args.json, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())

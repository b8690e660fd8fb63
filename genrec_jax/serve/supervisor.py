"""The multi-process server (``serve.py --workers N``, ``serve.http_workers``): N HTTP front
ends and one engine process.

One Python process cannot both parse HTTP at the rate the engine answers and run the
batcher's host work (README, Known limits). Here this process -- the supervisor -- keeps
the engine: it loads and compiles it, runs the batcher as the single-process server does,
and answers the front ends over a Unix socket (``ipc.EngineServer``). It binds the public
TCP socket itself and starts N front ends (``frontend.py``, fresh interpreters: started
with exec, never forked from this process after jax is loaded), which all accept on that
one socket, so the kernel hands each new connection to whichever front end takes it first.

    client --HTTP--> front end 1..N --frames over a Unix socket--> supervisor: Service -> Batcher -> Engine

Admission: each front end caps the model requests it has forwarded and not yet had answered
(``frontend.inflight_cap``) and sheds on its own event-loop lag; the engine's bounded queue
refuses at once (503) when full. Both refusals are answered without waiting on the model.

Shutdown: SIGTERM or SIGINT stops the front ends first (each finishes its open requests,
which the engine still answers), then the engine; the private directory (engine socket,
metrics files) is removed. A front end that exits on its own is logged and replaced; a
front end whose supervisor is killed outright notices and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from genrec_jax.config import ServeConfig
from genrec_jax.serve.app import Service
from genrec_jax.serve.frontend import inflight_cap
from genrec_jax.serve.ipc import EngineServer, frame_limit
from genrec_jax.serve.metrics import EngineMetrics

log = logging.getLogger("genrec_jax.serve")

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding genrec_jax/
STOP_GRACE_S = 10.0  # front ends' time to finish open requests before they are killed
CHECK_EVERY_S = 0.5
RESTART_BACKOFF_S = (1.0, 30.0)  # first and longest wait before replacing a front end that keeps dying


@dataclasses.dataclass
class _FrontEnd:
    slot: int
    proc: subprocess.Popen
    started: float
    backoff_s: float = RESTART_BACKOFF_S[0]


class Supervisor:
    """Args:
        cfg: the serving settings (``serve.*``).
        engine_factory: builds the engine; called in a background thread at start-up.
        workers: HTTP front-end processes (>= 1).
        host, port: where to listen (port 0: any free port; see ``port`` once ``started``).
        limit_concurrency: uvicorn's own limit per front end (default: 4 x the in-flight
            cap + 64, above the in-app cap so that the app, not uvicorn, refuses first).
        restart: replace a front end that exits on its own.
    """

    def __init__(self, cfg: ServeConfig, engine_factory: Callable, *, workers: int, host: str = "127.0.0.1",
                 port: int = 8000, log_level: str = "info", limit_concurrency: int | None = None,
                 restart: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cfg, self.workers, self.host, self.port = cfg, workers, host, port
        self.log_level, self.restart = log_level, restart
        self.limit_concurrency = limit_concurrency or 4 * inflight_cap(cfg) + 64
        self.service = Service(cfg, engine_factory, EngineMetrics())
        self.started = threading.Event()  # set once the socket is bound and the front ends are starting
        self.front_ends: list[_FrontEnd] = []
        self.deaths = 0  # front ends that exited on their own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._spawn_args: tuple[int, str, str, str] | None = None  # listener fd, engine socket, config, metrics dir

    # ----------------------------------------------------------------- public

    def run(self) -> int:
        """Serve until ``stop()`` or SIGTERM / SIGINT; returns the exit status."""
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            return runner.run(self._main())

    def stop(self) -> None:
        """Ask a running supervisor to shut down (from any thread)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def front_end_pids(self) -> list[int]:
        return [fe.proc.pid for fe in self.front_ends]

    # ----------------------------------------------------------------- the process

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        private = Path(tempfile.mkdtemp(prefix="genrec-serve-"))  # mode 0700: ours alone
        listener = None
        server = None
        try:
            try:
                listener = self._bind()
            except OSError as e:
                log.error("cannot listen on %s:%d: %s", self.host, self.port, e)
                return 1
            self.port = listener.getsockname()[1]
            engine_request = self.service.metrics.engine_request
            server = await EngineServer(self.service, str(private / "engine.sock"), frame_limit(self.cfg),
                                        on_request=lambda op, s: engine_request.labels(op).observe(s)).start()
            threading.Thread(target=self.service.start, name="genrec-engine-start", daemon=True).start()
            metrics_dir = private / "metrics"
            metrics_dir.mkdir()
            config_path = private / "serve_config.json"
            config_path.write_text(json.dumps(dataclasses.asdict(self.cfg)))
            self._spawn_args = (listener.fileno(), server.path, str(config_path), str(metrics_dir))
            self.front_ends = [self._spawn(i) for i in range(self.workers)]
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._on_signal, sig)
            log.info("%d HTTP front ends (pids %s) on http://%s:%d; engine process %d", self.workers,
                     ", ".join(map(str, self.front_end_pids())), self.host, self.port, os.getpid())
            self.started.set()
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), CHECK_EVERY_S)
                except TimeoutError:
                    self._check_front_ends()
        finally:
            await self._stop_front_ends()
            if server is not None:
                await server.close()
            self.service.stop()
            if listener is not None:
                listener.close()
            shutil.rmtree(private, ignore_errors=True)
            self.started.set()  # a caller waiting on a failed start wakes up
            log.info("stopped")
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: stopping the front ends, then the engine", signal.Signals(sig).name)
        self._stop.set()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return socket.create_server((self.host, self.port), family=family, backlog=2048)

    def _spawn(self, slot: int, backoff_s: float = RESTART_BACKOFF_S[0]) -> _FrontEnd:
        fd, engine_socket, config_path, metrics_dir = self._spawn_args
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir,
                   PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "genrec_jax.serve.frontend", "--fd", str(fd), "--engine-socket", engine_socket,
               "--config", config_path, "--parent-pid", str(os.getpid()), "--log-level", self.log_level,
               "--limit-concurrency", str(self.limit_concurrency)]
        proc = subprocess.Popen(cmd, pass_fds=(fd,), env=env)
        return _FrontEnd(slot, proc, time.monotonic(), backoff_s)

    def _check_front_ends(self) -> None:
        """Report front ends that exited; replace them (after a wait that grows while they
        keep dying young)."""
        now = time.monotonic()
        for i, fe in enumerate(self.front_ends):
            if fe.proc.returncode is not None or fe.proc.poll() is None:
                continue
            self.deaths += 1
            lived = now - fe.started
            log.error("HTTP front end %d (pid %d) exited with status %s after %.1f s%s", fe.slot, fe.proc.pid,
                      fe.proc.returncode, lived, "; starting another" if self.restart else "")
            self._mark_dead(fe.proc.pid)
            if self.restart:
                young = lived < RESTART_BACKOFF_S[1]  # dying young again: wait longer each time
                delay = fe.backoff_s if young else 0.0
                backoff = min(2 * fe.backoff_s, RESTART_BACKOFF_S[1]) if young else RESTART_BACKOFF_S[0]
                self._loop.call_later(delay, self._replace, i, fe, backoff)

    def _replace(self, i: int, dead: _FrontEnd, backoff_s: float) -> None:
        if self._stop.is_set() or self.front_ends[i] is not dead:
            return
        self.front_ends[i] = fe = self._spawn(dead.slot, backoff_s)
        log.info("HTTP front end %d restarted (pid %d)", fe.slot, fe.proc.pid)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, self._spawn_args[3])
        except OSError:
            pass

    async def _stop_front_ends(self) -> None:
        live = [fe.proc for fe in self.front_ends if fe.proc.poll() is None]
        for proc in live:
            proc.terminate()  # SIGTERM to that pid: uvicorn finishes open requests and exits
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the engine keeps answering their open requests meanwhile
        for proc in live:
            if proc.poll() is None:
                log.warning("front end %d did not stop within %.0f s; killing it", proc.pid, STOP_GRACE_S)
                proc.kill()
                proc.wait()

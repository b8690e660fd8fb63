"""Dynamic batching: a bounded queue in front of one worker thread that runs batches.

    submit(job)  --put_nowait-->  [bounded queue]  --worker-->  run(batch)  -->  futures

* The queue is bounded; when it is full ``submit`` raises ``Overloaded`` at once (the HTTP
  layer answers 503 with Retry-After). Nothing is ever dropped silently: every accepted
  job's future is resolved, with a result, an error, ``DeadlineExceeded`` or
  ``ShuttingDown``.
* The worker takes the oldest job and waits at most ``max_wait_s`` *from that job's
  arrival* for more, up to ``max_batch`` jobs; under load the queue already holds a full
  batch and nobody waits.
* Each job has a deadline. A job whose deadline passed while queued is answered with
  ``DeadlineExceeded`` without running, so an overloaded server sheds stale work instead
  of growing every admitted request's latency.

The batcher knows nothing about models: ``run(payloads) -> results`` (one result or
exception per payload) is the engine's ``process``.

Pipelining (``depth`` > 1, with ``dispatch`` and ``collect``): the worker only forms
batches and dispatches them (``dispatch(payloads) -> handle``, which launches the device
work and returns at once); a second thread waits for each batch's outputs
(``collect(handle) -> results``) and answers it. Up to ``depth`` batches are dispatched and
not yet answered, so the host work of one batch (building its inputs, launching its
kernels, copying and packaging the previous batch's answers) overlaps the device work of
another, instead of the device idling while the host works and the other way round.
Only a full batch is dispatched while an earlier one is unanswered; a part-full one keeps
filling until the device has answered (then it goes, as without pipelining): dispatched at
once it would only wait behind the other on the device, and more, smaller batches each pay
the per-batch host cost.

A job submitted with ``loop=`` gets an asyncio future of that event loop instead of a
``concurrent.futures.Future``. The worker hands a batch's outcomes to each loop in one
``call_soon_threadsafe`` call: with a thread future per job, every result wakes the loop
on its own (a write to the loop's self-pipe and a callback each, ~18% of the engine
process's CPU per request in a profile of the multi-process server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

from genrec_jax.serve.errors import DeadlineExceeded, Overloaded, ShuttingDown

log = logging.getLogger("genrec_jax.serve")

FILL_POLL_S = 0.0005  # pipelined: how often a part-full batch checks whether the device is free


@dataclasses.dataclass
class Ticket:
    payload: Any
    future: concurrent.futures.Future | asyncio.Future
    enqueued: float  # time.monotonic()
    deadline: float
    loop: asyncio.AbstractEventLoop | None = None  # set: ``future`` belongs to this loop

    def claim(self) -> bool:
        """False if the caller gave up (cancelled); a thread future is marked running."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()  # read from this thread; _settle checks again


def _settle(outcomes: list[tuple[asyncio.Future, Any, bool]]) -> None:
    """In the loop's thread: resolve each future not cancelled meanwhile."""
    for fut, value, failed in outcomes:
        if not fut.done():
            if failed:
                fut.set_exception(value)
            else:
                fut.set_result(value)


def _resolve(outcomes: list[tuple[Ticket, Any, bool]]) -> None:
    """Deliver (ticket, value, is exception) outcomes: thread futures directly, asyncio
    futures in one call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for t, value, failed in outcomes:
        if t.loop is None:
            if failed:
                t.future.set_exception(value)
            else:
                t.future.set_result(value)
        else:
            by_loop.setdefault(t.loop, []).append((t.future, value, failed))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            log.warning("dropped %d answers for a closed event loop", len(items))


class Batcher:
    """Args:
        run: processes a list of payloads, returning one result (or exception) per payload;
            if it raises, every job of the batch gets that exception.
        max_batch: most jobs per batch (the engine's largest batch bucket).
        max_wait_s: longest a job waits for companions (from its arrival).
        queue_size: most jobs waiting; more are refused.
        on_batch: ``(jobs in batch, seconds the oldest waited, every job's wait in seconds)``
            as each batch starts (metrics).
        on_done: ``(jobs in batch, seconds from its dispatch to its answers)`` once a batch's
            results are in, before they are handed back (metrics; not for a failed batch).
        dispatch, collect, depth: the pipelined form of ``run`` (module docstring);
            ``run`` is used when ``depth`` is 1 or either is missing.
    """

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], *, max_batch: int, max_wait_s: float,
                 queue_size: int, on_batch: Callable[[int, float, list[float]], None] | None = None,
                 on_done: Callable[[int, float], None] | None = None,
                 dispatch: Callable[[list[Any]], Any] | None = None,
                 collect: Callable[[Any], Sequence[Any]] | None = None, depth: int = 1):
        if depth < 1:
            raise ValueError(f"pipeline depth must be >= 1, got {depth}")
        self._run = run
        self._dispatch, self._collect_fn = dispatch, collect
        self.pipeline_depth = depth if (dispatch is not None and collect is not None) else 1
        self._slots = threading.Semaphore(self.pipeline_depth)  # batches dispatched and not yet answered
        self._handles: queue.Queue = queue.Queue()  # (live tickets, handle) for the collector
        self._collector: threading.Thread | None = None
        self._outstanding = 0  # batches dispatched and not yet answered (pipelined only)
        self._count_lock = threading.Lock()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._queue: queue.Queue[Ticket] = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch
        self._on_done = on_done
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "Batcher":
        if self._thread is None:
            if self.pipeline_depth > 1:
                self._collector = threading.Thread(target=self._collect_loop, name="genrec-collector", daemon=True)
                self._collector.start()
            self._thread = threading.Thread(target=self._loop, name="genrec-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; jobs still queued are answered with ``ShuttingDown``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = []
        if self._collector is not None:  # answers every batch already dispatched, then ends
            self._handles.put(None)
            self._collector.join(timeout)
            while True:  # anything queued behind the end marker (a worker that outlived its join)
                try:
                    item = self._handles.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    left += [(t, ShuttingDown("the server is shutting down"), True) for t in item[0]]
        while True:
            try:
                t = self._queue.get_nowait()
            except queue.Empty:
                break
            if t.claim():
                left.append((t, ShuttingDown("the server is shutting down"), True))
        _resolve(left)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # ----------------------------------------------------------------- producers

    def submit(self, payload: Any, timeout_s: float,
               loop: asyncio.AbstractEventLoop | None = None) -> concurrent.futures.Future | asyncio.Future:
        """Queue a job with a deadline ``timeout_s`` from now. Raises ``Overloaded`` (queue
        full) or ``ShuttingDown`` at once; never blocks. With ``loop`` (call from that loop's
        thread) the answer comes as an asyncio future of it."""
        if self._stop.is_set():
            raise ShuttingDown("the server is shutting down")
        now = time.monotonic()
        fut = concurrent.futures.Future() if loop is None else loop.create_future()
        t = Ticket(payload, fut, now, now + timeout_s, loop)
        try:
            self._queue.put_nowait(t)
        except queue.Full:
            raise Overloaded(f"request queue full ({self.queue_size} waiting); retry later") from None
        return t.future

    # ----------------------------------------------------------------- worker

    def _collect(self) -> list[Ticket] | None:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return None
        batch = [first]
        until = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if self._outstanding == 0 or self._stop.is_set():
                break
            # Pipelined, with an earlier batch not yet answered: a part-full batch dispatched
            # now would only wait behind it on the device, and more, smaller batches cost more
            # host time per request. Keep filling until the batch is full (then it goes at
            # once: the overlap) or the device has answered.
            try:
                batch.append(self._queue.get(timeout=FILL_POLL_S))
            except queue.Empty:
                pass
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch is None:
                continue
            now = time.monotonic()
            live, late = [], []
            for t in batch:
                if not t.claim():
                    continue  # the caller gave up (cancelled) while it waited
                if now > t.deadline:
                    late.append((t, DeadlineExceeded(
                        f"request waited {1e3 * (now - t.enqueued):.0f} ms in the queue, past its deadline"), True))
                    continue
                live.append(t)
            if late:
                _resolve(late)
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(len(live), now - live[0].enqueued, [now - t.enqueued for t in live])
            self._execute(live)
            self.batches += 1

    def _execute(self, live: list[Ticket]) -> None:
        if self.pipeline_depth > 1:
            return self._pipelined(live)
        t0 = time.perf_counter()
        try:
            results = self._run([t.payload for t in live])
        except BaseException as e:  # noqa: BLE001 -- every caller must hear about it
            self._failed(live, e)
            return
        self._done(len(live), t0)
        _resolve([(t, r, isinstance(r, BaseException)) for t, r in zip(live, results)])

    def _done(self, jobs: int, t0: float) -> None:
        if self._on_done is not None:
            try:
                self._on_done(jobs, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 -- a metrics hook must not cost anyone an answer
                log.exception("on_done hook failed")

    @staticmethod
    def _failed(live: list[Ticket], e: BaseException) -> None:
        log.error("batch of %d failed", len(live), exc_info=e)
        _resolve([(t, e, True) for t in live])

    def _pipelined(self, live: list[Ticket]) -> None:
        self._slots.acquire()  # at most ``depth`` batches between dispatch and answer
        t0 = time.perf_counter()
        try:
            handle = self._dispatch([t.payload for t in live])
        except BaseException as e:  # noqa: BLE001
            self._slots.release()
            self._failed(live, e)
            return
        with self._count_lock:
            self._outstanding += 1
        self._handles.put((live, handle, t0))

    def _collect_loop(self) -> None:
        while True:
            item = self._handles.get()
            if item is None:
                return
            live, handle, t0 = item
            try:
                results = self._collect_fn(handle)
            except BaseException as e:  # noqa: BLE001
                self._failed(live, e)
            else:
                self._done(len(live), t0)
                _resolve([(t, r, isinstance(r, BaseException)) for t, r in zip(live, results)])
            finally:
                with self._count_lock:
                    self._outstanding -= 1
                self._slots.release()

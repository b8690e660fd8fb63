"""Batcher: own results under concurrency, bounded queue refuses at once, deadlines, errors."""

import concurrent.futures
import threading
import time

import pytest

from genrec_jax.serve.batcher import Batcher
from genrec_jax.serve.errors import DeadlineExceeded, Overloaded, ShuttingDown


def make(run, **kw):
    opts = dict(max_batch=8, max_wait_s=0.002, queue_size=64)
    opts.update(kw)
    return Batcher(run, **opts).start()


def test_each_caller_gets_its_own_result():
    sizes = []

    def run(payloads):
        sizes.append(len(payloads))
        time.sleep(0.002)  # a batch takes time, so requests pile up and batch together
        return [p * 10 for p in payloads]

    b = make(run, queue_size=256)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futs = list(pool.map(lambda i: (i, b.submit(i, 5.0)), range(200)))
            for i, f in futs:
                assert f.result(5) == i * 10, "a caller got another caller's result"
    finally:
        b.stop()
    assert sum(sizes) == 200 and max(sizes) > 1 and max(sizes) <= 8, sizes


def test_full_queue_refuses_immediately():
    gate = threading.Event()
    b = make(lambda ps: (gate.wait(5), ps)[1], queue_size=3, max_batch=1)
    try:
        accepted = [b.submit(0, 5.0)]
        time.sleep(0.05)  # the worker takes the first job and blocks on the gate
        accepted += [b.submit(i, 5.0) for i in range(3)]  # fills the queue
        t0 = time.perf_counter()
        with pytest.raises(Overloaded):
            b.submit(99, 5.0)
        assert time.perf_counter() - t0 < 0.01, "a full queue must refuse at once, not block"
        gate.set()
        assert [f.result(5) for f in accepted] == [0, 0, 1, 2], "accepted jobs must all be answered"
    finally:
        gate.set()
        b.stop()


def test_deadline_expires_in_queue():
    gate = threading.Event()
    b = make(lambda ps: (gate.wait(5), ps)[1], max_batch=1)
    try:
        first = b.submit(1, 5.0)
        time.sleep(0.02)
        late = b.submit(2, 0.01)
        time.sleep(0.05)
        gate.set()
        assert first.result(5) == 1
        with pytest.raises(DeadlineExceeded):
            late.result(5)
    finally:
        gate.set()
        b.stop()


def test_errors_reach_every_caller():
    def run(payloads):
        if 0 in payloads:
            raise RuntimeError("batch failed")
        return [ValueError("bad") if p == 1 else p for p in payloads]

    b = make(run, max_wait_s=0.05)
    try:
        with pytest.raises(RuntimeError):
            b.submit(0, 5.0).result(5)
        f1, f2 = b.submit(1, 5.0), b.submit(2, 5.0)
        with pytest.raises(ValueError):
            f1.result(5)
        assert f2.result(5) == 2
    finally:
        b.stop()


def test_stop_answers_queued_jobs():
    gate = threading.Event()
    b = make(lambda ps: (gate.wait(5), ps)[1], max_batch=1)
    b.submit(0, 5.0)
    time.sleep(0.02)
    queued = b.submit(1, 5.0)
    threading.Timer(0.05, gate.set).start()
    b.stop()
    with pytest.raises(ShuttingDown):
        queued.result(5)
    with pytest.raises(ShuttingDown):
        b.submit(2, 5.0)


def test_loop_futures_get_their_own_results_with_one_wakeup_per_batch():
    """Jobs submitted with ``loop=``: asyncio futures, each resolved with its own result (or
    error), and each batch's outcomes handed to the loop in a single call."""
    import asyncio

    sizes = []

    def run(payloads):
        sizes.append(len(payloads))
        time.sleep(0.002)
        return [ValueError(f"bad {p}") if p % 7 == 3 else p * 10 for p in payloads]

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        plain = loop.call_soon_threadsafe

        def counting(cb, *args):
            calls.append(cb)
            return plain(cb, *args)

        loop.call_soon_threadsafe = counting
        b = make(run, queue_size=256)
        try:
            futs = [b.submit(i, 5.0, loop=loop) for i in range(100)]
            assert all(isinstance(f, asyncio.Future) for f in futs)
            got = await asyncio.gather(*futs, return_exceptions=True)
        finally:
            b.stop()
        for i, r in enumerate(got):
            if i % 7 == 3:
                assert isinstance(r, ValueError) and str(r) == f"bad {i}"
            else:
                assert r == i * 10, "a caller got another caller's result"
        assert sum(sizes) == 100 and max(sizes) > 1
        assert len(calls) == len(sizes), (len(calls), sizes)  # one wake-up per batch, not per job

    asyncio.run(main())


def test_loop_futures_cancelled_or_late_are_not_run():
    """A caller that cancelled before its batch ran is skipped; a job past its deadline in the
    queue gets DeadlineExceeded through its loop."""
    import asyncio

    gate = threading.Event()
    ran = []

    def run(payloads):
        gate.wait(5)
        ran.extend(payloads)
        return payloads

    async def main():
        loop = asyncio.get_running_loop()
        b = make(run, max_batch=1)
        try:
            first = b.submit(0, 5.0, loop=loop)
            await asyncio.sleep(0.02)  # the worker holds job 0 at the gate
            gone = b.submit(1, 5.0, loop=loop)
            late = b.submit(2, 0.01, loop=loop)
            kept = b.submit(3, 5.0, loop=loop)
            gone.cancel()
            await asyncio.sleep(0.05)
            gate.set()
            assert await first == 0 and await kept == 3
            with pytest.raises(DeadlineExceeded):
                await late
        finally:
            gate.set()
            b.stop()
        assert ran == [0, 3]

    asyncio.run(main())


class _Device:
    """A stand-in for the engine's two halves: ``dispatch`` returns at once with a handle,
    ``collect`` waits until the 'device' (a gate per batch) has finished that batch."""

    def __init__(self, fail_dispatch=None, fail_collect=None):
        self.lock = threading.Lock()
        self.outstanding = 0  # dispatched, not yet collected
        self.most = 0
        self.order = []  # batches in dispatch order
        self.fail_dispatch, self.fail_collect = fail_dispatch, fail_collect

    def dispatch(self, payloads):
        if self.fail_dispatch is not None and self.fail_dispatch in payloads:
            raise RuntimeError("dispatch failed")
        with self.lock:
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
            self.order.append(list(payloads))
        done = threading.Event()
        threading.Timer(0.004, done.set).start()  # the device's time for this batch
        return payloads, done

    def collect(self, handle):
        payloads, done = handle
        done.wait(5)
        with self.lock:
            self.outstanding -= 1
        if self.fail_collect is not None and self.fail_collect in payloads:
            raise RuntimeError("collect failed")
        return [ValueError("bad") if p == -1 else p * 10 for p in payloads]


@pytest.mark.parametrize("depth", [2, 3])
def test_pipelined_keeps_at_most_depth_batches_in_flight_and_answers_everyone(depth):
    dev = _Device()
    b = make(None, dispatch=dev.dispatch, collect=dev.collect, depth=depth, queue_size=512)
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futs = list(pool.map(lambda i: (i, b.submit(i, 5.0)), range(300)))
            for i, f in futs:
                assert f.result(5) == i * 10, "a caller got another caller's result"
    finally:
        b.stop()
    assert 1 < dev.most <= depth, (dev.most, depth)
    assert sorted(p for batch in dev.order for p in batch) == list(range(300))
    assert max(len(batch) for batch in dev.order) <= 8


def test_pipelined_errors_reach_the_right_callers():
    dev = _Device(fail_dispatch=0, fail_collect=1)
    b = make(None, dispatch=dev.dispatch, collect=dev.collect, depth=2, max_batch=1)
    try:
        f0, f1, f2, f3 = (b.submit(p, 5.0) for p in (0, 1, 2, -1))
        with pytest.raises(RuntimeError, match="dispatch failed"):
            f0.result(5)
        with pytest.raises(RuntimeError, match="collect failed"):
            f1.result(5)
        assert f2.result(5) == 20
        with pytest.raises(ValueError):
            f3.result(5)
        assert b.submit(3, 5.0).result(5) == 30, "failures must not leak pipeline slots"
    finally:
        b.stop()


def test_pipelined_stop_answers_dispatched_and_queued_jobs():
    gate = threading.Event()
    dev = _Device()
    real_collect = dev.collect
    b = make(None, dispatch=dev.dispatch, collect=lambda h: (gate.wait(5), real_collect(h))[1], depth=2,
             max_batch=1)
    running = [b.submit(i, 5.0) for i in range(2)]  # both dispatched, answers held at the gate
    time.sleep(0.05)
    queued = b.submit(9, 5.0)  # the worker blocks: two batches already in flight
    time.sleep(0.05)
    threading.Timer(0.05, gate.set).start()
    b.stop()
    assert [f.result(5) for f in running] == [0, 10], "dispatched batches are answered on stop"
    try:
        assert queued.result(5) == 90  # dispatched once a slot freed, before the worker saw stop
    except ShuttingDown:
        pass  # or still queued when the worker stopped: answered ShuttingDown, never dropped


def test_depth_one_or_missing_halves_runs_in_one_call():
    calls = []
    b = make(lambda ps: (calls.append(len(ps)), [p + 1 for p in ps])[1], dispatch=None, collect=None, depth=3)
    try:
        assert b.pipeline_depth == 1 and b.submit(1, 5.0).result(5) == 2 and calls
    finally:
        b.stop()
    with pytest.raises(ValueError):
        Batcher(lambda ps: ps, max_batch=1, max_wait_s=0, queue_size=1, depth=0)


def test_pipelined_dispatches_part_full_batches_only_when_the_device_is_free():
    """While a batch is unanswered, the next is dispatched only once full; a trickle of
    jobs meanwhile joins one batch instead of going out one by one behind it."""
    gate = threading.Event()
    dev = _Device()
    real_collect = dev.collect
    b = make(None, dispatch=dev.dispatch, collect=lambda h: (gate.wait(5), real_collect(h))[1], depth=2,
             max_batch=8, max_wait_s=0.001)
    try:
        first = b.submit(0, 5.0)
        time.sleep(0.03)  # dispatched alone; its answer is held at the gate
        trickle = []
        for i in range(1, 6):  # arrive one by one, each far past max_wait after the first
            trickle.append(b.submit(i, 5.0))
            time.sleep(0.01)
        assert dev.order == [[0]], f"part-full batches went out behind an unanswered one: {dev.order}"
        full = [b.submit(i, 5.0) for i in range(6, 9)]  # 1..8: the waiting batch is now full
        time.sleep(0.03)
        assert dev.order == [[0], list(range(1, 9))], dev.order
        gate.set()
        assert [f.result(5) for f in [first, *trickle, *full]] == [10 * i for i in range(9)]
        late = b.submit(9, 5.0)  # the device is free again: a lone job goes after max_wait
        assert late.result(5) == 90 and dev.order[-1] == [9]
    finally:
        gate.set()
        b.stop()


@pytest.mark.parametrize("depth", [1, 2])
def test_on_done_reports_each_answered_batch_with_its_duration(depth):
    """``on_done`` sees every batch that was answered, with the time from its dispatch to its
    answers (the 'device' takes 4 ms a batch here), and no batch that failed."""
    dev = _Device(fail_collect=-7)
    done = []
    lock = threading.Lock()

    def on_done(jobs, seconds):
        with lock:
            done.append((jobs, seconds))

    if depth == 1:  # the one-call form: dispatch and collect in one run
        b = make(lambda ps: dev.collect(dev.dispatch(ps)), queue_size=512, on_done=on_done)
    else:
        b = make(None, dispatch=dev.dispatch, collect=dev.collect, depth=depth, queue_size=512, on_done=on_done)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futs = list(pool.map(lambda i: b.submit(i, 5.0), range(100)))
            for f in futs:
                assert f.result(5) is not None
        bad = b.submit(-7, 5.0)
        with pytest.raises(RuntimeError):
            bad.result(5)
    finally:
        b.stop()
    assert sum(jobs for jobs, _ in done) == 100, "every answered job is counted once; the failed batch is not"
    assert all(0.004 <= s < 1.0 for _, s in done), done


def test_on_batch_sees_every_jobs_wait():
    """``on_batch`` gets the batch size, the oldest job's wait and each job's wait (oldest
    first), all measured when the batch starts."""
    gate = threading.Event()
    seen = []
    b = make(lambda ps: (gate.wait(5), ps)[1], max_batch=8,
             on_batch=lambda n, oldest, waits: seen.append((n, oldest, list(waits))))
    try:
        first = b.submit(0, 5.0)
        time.sleep(0.05)  # the worker runs the first batch and blocks on the gate
        rest = [b.submit(i, 5.0) for i in range(1, 4)]
        time.sleep(0.03)
        gate.set()
        assert [f.result(5) for f in [first, *rest]] == [0, 1, 2, 3]
    finally:
        gate.set()
        b.stop()
    assert [n for n, _, _ in seen] == [1, 3], seen
    n, oldest, waits = seen[1]
    assert oldest == waits[0] and waits == sorted(waits, reverse=True), seen
    assert all(w >= 0.03 for w in waits), "the three waited behind the blocked first batch"

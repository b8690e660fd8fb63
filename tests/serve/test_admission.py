"""The in-flight limit (serve.max_inflight, serve.target_latency_ms): fixed, or adapted to
hold the admitted requests' latency near a target."""

import concurrent.futures
import dataclasses
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_jax.serve.app import InflightLimit, create_app

from .conftest import events
from .test_app import wait_ready


class Clock:
    def __init__(self):
        self.t = 0.0

    def answers(self, lim: InflightLimit, latencies, inflight: int) -> None:
        """Answers arriving over one window, with ``inflight`` requests in progress each time
        one more was admitted."""
        for x in latencies:
            lim.admits(inflight)
            self.t += 1.001 * InflightLimit.WINDOW_S / max(1, len(latencies) - 1)
            lim.observe(x, now=self.t)


def test_fixed_cap_does_not_adapt():
    lim, clock = InflightLimit(10), Clock()
    clock.answers(lim, [5.0] * 100, inflight=9)  # very slow answers: no target, no change
    assert lim.limit == 10 and lim.admits(9) and not lim.admits(10)
    assert InflightLimit(0).admits(10**6)  # no cap at all


def test_slow_answers_shrink_the_limit_and_fast_ones_restore_it():
    lim, clock = InflightLimit(32, target_ms=20), Clock()
    clock.answers(lim, [0.040] * 32, inflight=31)  # a window at 40 ms with the limit binding: halved
    assert lim.limit == 16 and not lim.admits(16) and lim.admits(15)
    clock.answers(lim, [0.025] * 16, inflight=15)  # 25 ms: shrink by 20/25
    assert lim.limit == pytest.approx(12.8)
    for _ in range(30):
        clock.answers(lim, [0.005] * 32, inflight=2)
    assert lim.limit == 32  # back at the cap, never above


def test_slow_answers_with_few_in_flight_change_nothing():
    """A stall elsewhere (slow answers while few requests are in progress) is not queueing
    on what was admitted: refusing more would not help, so the limit stays."""
    lim, clock = InflightLimit(32, target_ms=20), Clock()
    clock.answers(lim, [0.200] * 32, inflight=3)
    assert lim.limit == 32


def test_a_window_needs_time_as_well_as_answers():
    lim = InflightLimit(8, target_ms=10)
    for i in range(100):  # 100 slow answers within 10 ms: one window still open
        lim.admits(7)
        lim.observe(0.5, now=1e-4 * i)
    assert lim.limit == 8
    lim.admits(7)
    lim.observe(0.5, now=InflightLimit.WINDOW_S)
    assert lim.limit == 4


def test_a_few_slow_answers_in_a_window_do_not_count():
    lim, clock = InflightLimit(20, target_ms=10), Clock()
    clock.answers(lim, [0.5] * 2 + [0.002] * 18, inflight=19)  # two of twenty over the target
    assert lim.limit == 20


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(1, 512), target=st.floats(0.1, 1000),
       answers=st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 600), st.floats(0, 0.1)),
                        max_size=600))
def test_limit_stays_between_min_and_cap(cap, target, answers):
    lim, now = InflightLimit(cap, target_ms=target), 0.0
    for latency, inflight, dt in answers:
        lim.admits(inflight)
        now += dt
        lim.observe(latency, now=now)
        assert min(InflightLimit.MIN, cap) <= lim.limit <= cap


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="target_latency_ms"):
        InflightLimit(8, target_ms=-1)
    with pytest.raises(ValueError, match="max_inflight"):
        InflightLimit(0, target_ms=10)


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"/metrics lacks {name}")


def test_server_adapts_its_limit_to_the_target(engine, serve_cfg, monkeypatch):
    """A slow engine (60 ms a batch) against a 20 ms target, with the limit binding: after one
    window of answers it is halved (shown in /metrics); once the engine is fast again it
    grows back. (A full limit refuses as the fixed cap does:
    test_app.test_inflight_cap_refuses_before_parsing.)"""
    cfg = dataclasses.replace(serve_cfg, max_inflight=16, target_latency_ms=20.0, timeout_ms=20_000.0)
    real = engine.dispatch
    delay = [0.06]

    def slow(jobs, **kw):
        time.sleep(delay[0])
        return real(jobs, **kw)

    monkeypatch.setattr(engine, "dispatch", slow)
    with TestClient(create_app(cfg, engine)) as c:
        wait_ready(c)
        assert metric(c, "genrec_inflight_limit") == 16

        def call(i):
            return c.post("/v1/recommend", json={"history": events([f"i{i % 100 + 1}"]), "k": 3}).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # 16 at once: the limit binds
            assert list(pool.map(call, range(16))) == [200] * 16  # batches of 4, 60 ms each: >= 60 ms
        assert metric(c, "genrec_inflight_limit") == 8
        delay[0] = 0.0
        for i in range(0, 400, 8):  # fast answers: the next window grows it again
            assert [call(i + j) for j in range(8)] == [200] * 8
            if metric(c, "genrec_inflight_limit") > 8:
                break
        assert metric(c, "genrec_inflight_limit") == 9


@pytest.mark.parametrize("override", ["serve.target_latency_ms=-5", "serve.max_inflight=-1"])
def test_config_names_a_bad_admission_setting(override):
    from genrec_jax.config import load_config, preset_path

    with pytest.raises(Exception, match=override.split("=")[0].replace(".", r"\.")):
        load_config(preset_path("tiny"), [override])

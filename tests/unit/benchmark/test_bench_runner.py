"""tandem.benchmark.runner: Poisson and gamma arrivals, and the load a measurement puts on a fake
backend (when requests start, how many are in flight at once)."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from tandem.benchmark.config import BenchConfig
from tandem.benchmark.datasets import SampleRequest
from tandem.benchmark.metrics import RequestRecord
from tandem.benchmark.runner import arrival_offsets, measure


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


@pytest.mark.parametrize("rate", [0.5, 10.0, 200.0])
def test_poisson_arrivals_have_the_asked_mean_rate(rate):
    offsets = arrival_offsets(5000, rate, 1.0, np.random.default_rng(0))
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(rate, rel=0.05)
    g = gaps(offsets)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.07)  # exponential gaps: coefficient of variation 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_keeps_the_rate_and_changes_the_spread(burstiness):
    g = gaps(arrival_offsets(8000, 5.0, burstiness, np.random.default_rng(1)))
    assert 1 / g.mean() == pytest.approx(5.0, rel=0.06)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)  # gamma's CV


def test_infinite_rate_sends_everything_at_once_and_seeds_repeat():
    assert arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5
    assert arrival_offsets(5, 3.0, 1.0, np.random.default_rng(7)) == arrival_offsets(5, 3.0, 1.0,
                                                                                       np.random.default_rng(7))


class SleepyBackend:
    """Answers every request after `seconds`, with 4 one-token deltas; tracks requests in flight."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.in_flight = self.max_in_flight = 0

    async def send(self, request: SampleRequest) -> RequestRecord:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        record = RequestRecord(prompt_len=request.prompt_len)
        for i in range(1, 5):
            await asyncio.sleep(self.seconds / 4)
            record.add_delta(self.seconds * i / 4, 1)
        self.in_flight -= 1
        return record.finish()


REQUESTS = [SampleRequest("p", 5, 4)] * 12
CONFIG = BenchConfig(progress=False, result_file="unused.json")


def run_measure(backend, rate, cap, seed=0):
    return asyncio.run(measure(backend, REQUESTS, rate, cap, CONFIG, np.random.default_rng(seed)))


def finish_times(records) -> list[float]:
    return sorted(r.start + r.e2el for r in records)


# Timing checks are one-sided or logical (who started before whom finished): on a loaded machine
# the event loop can stall, which makes everything later but never earlier.
def test_a_concurrency_cap_bounds_requests_in_flight():
    backend = SleepyBackend(0.04)
    m = run_measure(backend, math.inf, 3)
    assert backend.max_in_flight == 3 and m.metrics["completed"] == 12
    starts = sorted(r.start for r in m.records)
    assert starts[3] >= finish_times(m.records)[0] - 1e-3  # the fourth waited for a free slot
    assert m.duration >= 4 * 0.04 * 0.9  # 12 requests in (at least) 4 waves of 3
    assert m.metrics["total_input_tokens"] == 60 and m.metrics["total_output_tokens"] == 48


def test_infinite_rate_without_a_cap_sends_all_at_once():
    backend = SleepyBackend(0.04)
    m = run_measure(backend, math.inf, None)
    assert backend.max_in_flight == 12
    assert max(r.start for r in m.records) <= finish_times(m.records)[0]  # all sent before any finished


def test_a_request_rate_spreads_the_sends_over_the_schedule():
    offsets = arrival_offsets(12, 20.0, 1.0, np.random.default_rng(5))
    m = run_measure(SleepyBackend(0.01), 20.0, None, seed=5)
    lateness = np.asarray(sorted(r.start for r in m.records)) - np.asarray(offsets)
    assert lateness.min() >= -2e-3  # never before its arrival time
    assert np.median(lateness) < 0.05 and offsets[-1] > 0.2  # the schedule spreads the sends
    assert m.label == "rate 20" and m.metrics["completed"] == 12

"""Runs a benchmark: the prompts, the warm-up, then one measurement per offered load.

Arrivals follow vLLM's get_request: gaps between requests are gamma-distributed with mean
1 / rate and shape `burstiness` (1: a Poisson process; below 1 burstier, above 1 more regular);
rate inf sends every request at once. A concurrency cap (`--max-concurrency`) makes an arrived
request wait for a free slot; its latencies count from when it is sent, as in vLLM.

Each measurement gets its own slice of the prompts, so a sweep never measures prompts an earlier
load already left in the server's prefix cache.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tandem.benchmark.backends import make_backend
from tandem.benchmark.config import BenchConfig
from tandem.benchmark.datasets import SampleRequest
from tandem.benchmark.metrics import RequestRecord, summarize


@dataclass
class Measurement:
    """One offered load's requests and metrics (metrics.summarize's dict)."""

    request_rate: float
    max_concurrency: int | None
    records: list[RequestRecord]
    duration: float
    metrics: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate {rate}" + (f", concurrency {self.max_concurrency}" if self.max_concurrency else "")


@dataclass
class BenchmarkResult:
    config: BenchConfig
    model: str | None
    measurements: list[Measurement]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def arrival_offsets(num_requests: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Seconds from the start at which each request arrives: the first at 0, then gamma gaps of
    mean 1 / rate (shape `burstiness`); all 0 for an infinite rate."""
    if math.isinf(rate) or num_requests == 0:
        return [0.0] * num_requests
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def run_benchmark(config: BenchConfig, on_measurement: Callable[[Measurement], None] | None = None,
                  log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Prepares the prompts, then warms up and measures every load of `config` in order."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    backend = make_backend(config)
    loads = config.loads
    requests = backend.prepare(config.num_warmups + config.num_prompts * len(loads))
    where = config.target if config.backend == "tandem" else config.base_url
    log(f"tandem bench: {config.backend} at {where}, model {backend.model or '(server default)'}, "
        f"{config.num_prompts} {config.dataset} prompts x {len(loads)} load(s)")
    measurements = asyncio.run(_run(config, backend, requests, loads, on_measurement, log))
    return BenchmarkResult(config, backend.model, measurements)


async def _run(config: BenchConfig, backend, requests: list[SampleRequest], loads, on_measurement, log
               ) -> list[Measurement]:
    await backend.open()
    try:
        warmups, requests = requests[:config.num_warmups], requests[config.num_warmups:]
        if warmups:
            bar = _progress(config, "warm-up", len(warmups))
            records = await _send_all(backend, warmups, [0.0] * len(warmups), loads[0][1], bar)
            num_failed = sum(not r.success for r in records)
            log(f"warm-up: {len(records)} requests" + (f", {num_failed} failed" if num_failed else ""))
        rng = np.random.default_rng(config.seed)
        measurements = []
        for i, (rate, cap) in enumerate(loads):
            batch = requests[i * config.num_prompts:(i + 1) * config.num_prompts]
            m = await measure(backend, batch, rate, cap, config, rng)
            measurements.append(m)
            if on_measurement is not None:
                on_measurement(m)
        return measurements
    finally:
        await backend.close()


async def measure(backend, requests: list[SampleRequest], rate: float, max_concurrency: int | None,
                  config: BenchConfig, rng: np.random.Generator) -> Measurement:
    """Sends `requests` at `rate` (at most `max_concurrency` at once) and summarizes them."""
    offsets = arrival_offsets(len(requests), rate, config.burstiness, rng)
    label = Measurement(rate, max_concurrency, [], 0.0).label
    start = time.perf_counter()
    records = await _send_all(backend, requests, offsets, max_concurrency, _progress(config, label, len(requests)))
    duration = time.perf_counter() - start
    metrics = summarize(records, duration, config.percentiles, config.goodput)
    return Measurement(rate, max_concurrency, records, duration, metrics)


async def _send_all(backend, requests: list[SampleRequest], offsets: list[float], max_concurrency: int | None,
                    bar) -> list[RequestRecord]:
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(request: SampleRequest, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with slots:
            sent = time.perf_counter() - start
            record = await backend.send(request)
        record.start = sent
        bar.update(1)
        return record

    with bar:
        return list(await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets))))


def _progress(config: BenchConfig, label: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=not config.progress, file=sys.stderr, leave=False)

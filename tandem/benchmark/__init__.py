"""`tandem bench`: a load generator for LLM servers, after vLLM's benchmarks/benchmark_serving.py
(`vllm bench serve`): the same load model (Poisson or gamma arrivals, a concurrency cap), the same
metrics (TTFT, TPOT, ITL, E2E latency, throughput, goodput under SLOs) and the same result table.

It drives a tandem gateway over gRPC (the SDK) or any OpenAI-compatible HTTP server (vLLM, SGLang,
llama.cpp, tandem's own HTTP API) with streamed completions, and writes JSON and a PNG per run.

    from tandem.benchmark import BenchConfig, run_benchmark

    result = run_benchmark(BenchConfig(backend="tandem", target="127.0.0.1:50051", request_rates=[1.0, 4.0]))
    result.measurements[0].metrics["p99_ttft_ms"]

Modules: config (the typed settings), datasets (prompts), sse (server-sent events), backends (one
streamed request -> a RequestRecord), runner (arrivals, concurrency, sweeps), metrics (the
numbers), report (table, JSON, PNG), cli (the `tandem bench` subcommand). httpx, grpc and
matplotlib are imported only where a run needs them, so `tandem --help` stays quick.
"""
from __future__ import annotations

from tandem.benchmark.config import BenchConfig, BenchmarkError
from tandem.benchmark.datasets import SampleRequest, load_requests
from tandem.benchmark.metrics import RequestRecord, summarize
from tandem.benchmark.runner import BenchmarkResult, Measurement, arrival_offsets, run_benchmark
from tandem.benchmark.sse import SSEEvent, SSEParser

__all__ = ["BenchConfig", "BenchmarkError", "BenchmarkResult", "Measurement", "RequestRecord", "SSEEvent", "SSEParser",
           "SampleRequest", "arrival_offsets", "load_requests", "run_benchmark", "summarize"]

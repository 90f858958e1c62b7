"""Pipeline benchmark: the gRPC pipeline against the in-process engine, side by side in one run.

The in-process side is the engine's own streaming API (AsyncEngine over `tandem.LLM(...).engine`),
timed where its caller sees each StreamDelta; the pipeline side is the SDK (Client, AsyncClient)
against the gateway, timed where the client sees each Chunk. Both are separate model instances in
this process, take the same token-id prompts and the same torch thread count, and run one after
the other in interleaved rounds (in-process, pipeline, in-process, ...), so machine noise hits
both alike; every ratio is pipeline / in-process of medians over the rounds.

1. Batch 1: one greedy request (EOS ignored): TTFT, and the gaps between sample 0's token arrivals
   (mean, p50, p99). Disaggregated, TTFT holds the prefill worker's KV publish (its Prefill call
   answers after it) and the first gap the decode worker's fetch.
2. Aggregate tokens/s of `--concurrency` streams at once.
3. Disaggregated only, the KV handoff of long prompts (max_tokens=2) per 1,000 prompt tokens: the
   prefill worker's time, the KV transfer (its publish + the decode worker's fetch) and the bytes
   the decode worker fetched (its Stats `kv_bytes_fetched`); the in-process column there is the
   engine's TTFT on the same prompt.
Every prompt is a fresh window of the Shakespeare that ships with tandem (tandem/data, 250 KB,
~75k tokens): no cache holds it. A round takes ~4.7k tokens at the default sizes, so the text
holds ~15 rounds; the default 3 take the same windows as runs before 2026-11-30, which cut them
from the first 400,000 characters of the full 1 MB text.

    .venv/bin/python bench/pipeline.py [--launcher inprocess|ray] [--mode disaggregated|aggregated] [--disaggregate always|auto|never]
        [--rounds 3] [--threads 2] [--json bench/pipeline.json]

--launcher inprocess (the default) runs every service on loopback threads of this process and so
isolates the gRPC path; ray runs them as Ray actors, as `tandem serve` does, adding process hops.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

import tandem
from tandem.data import SHAKESPEARE
from tandem.engine.async_engine import AsyncEngine
from tandem.orchestration.topology import free_port
from tandem.outputs import StreamDelta
from tandem.sdk import AsyncClient, Client
from tandem.services.config import PipelineConfig
from tandem.v1 import common_pb2, decode_pb2_grpc

KV_CACHE_MEMORY = 256 << 20  # per engine; holds ~5.8k tokens of the default model in fp32
KV_MAX_TOKENS = 2  # the KV probe: a prefill worker's token, then one from the decode worker
RAY_OBJECT_STORE_BYTES = 256 << 20  # KV moves over gRPC, not through Ray's object store
_request_ids = itertools.count()


class Trace:
    """Arrival times of one request's tokens, stamped on the caller's side."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times0: list[float] = []  # one per token of sample 0
        self.num_tokens = 0

    def add(self, index: int, token_ids: list[int]) -> None:
        now = time.perf_counter()
        self.num_tokens += len(token_ids)
        if index == 0:
            self.times0 += [now] * len(token_ids)

    @property
    def ttft(self) -> float:
        return self.times0[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times0, self.times0[1:])]


class Windows:
    """Consecutive, disjoint token windows of the text: each prompt is new to every cache."""

    def __init__(self, ids: list[int]):
        self.ids, self.pos = ids, 0

    def take(self, length: int) -> list[int]:
        if self.pos + length > len(self.ids):
            raise SystemExit(f"the text ran out of fresh prompts ({len(self.ids)} tokens): use fewer --rounds")
        self.pos += length
        return self.ids[self.pos - length:self.pos]


# -- the two sides -------------------------------------------------------------------------------
def greedy(max_tokens: int) -> dict:
    return dict(temperature=0, max_tokens=max_tokens, ignore_eos=True)


async def engine_request(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> Trace:
    params = tandem.SamplingParams(**greedy(max_tokens))
    trace = Trace()
    stream = await engine.add_request(f"bench-{next(_request_ids)}", prompt, params)
    async for item in stream:
        if isinstance(item, StreamDelta):
            trace.add(item.index, item.token_ids)
    return trace


async def client_request(client: AsyncClient, prompt: list[int], max_tokens: int) -> Trace:
    trace = Trace()
    async for chunk in client.generate(prompt, **greedy(max_tokens)):
        trace.add(chunk.index, chunk.token_ids)
    return trace


def blocking_request(client: Client, prompt: list[int], max_tokens: int) -> tuple[Trace, object]:
    """Returns the trace and the final chunk's Timings."""
    trace, timings = Trace(), None
    for chunk in client.generate(prompt, **greedy(max_tokens)):
        trace.add(chunk.index, chunk.token_ids)
        timings = chunk.timings or timings
    return trace, timings


async def tokens_per_s(request, target, prompts: list[list[int]], max_tokens: int) -> float:
    start = time.perf_counter()
    traces = await asyncio.gather(*(request(target, p, max_tokens) for p in prompts))
    return sum(t.num_tokens for t in traces) / (time.perf_counter() - start)


def start_pipeline(args):
    config = PipelineConfig(mode=args.mode, grpc_port=free_port(), http_port=None, num_threads=args.threads,
                            kv_cache_memory=KV_CACHE_MEMORY, object_store_memory=RAY_OBJECT_STORE_BYTES,
                            disaggregate=args.disaggregate)
    if args.launcher == "ray":
        from tandem.orchestration.ray_launcher import RayPipeline

        return RayPipeline(config).start()
    from tandem.orchestration.local import InProcessPipeline

    return InProcessPipeline(config).start()


def kv_bytes_counter(pipe) -> Callable[[], float]:
    """The decode worker's running count of KV bytes it fetched from the store (its Stats)."""
    address = pipe.address_of("decode-0") if hasattr(pipe, "address_of") else pipe.addresses()["decode-0"]  # Ray
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(address))
    token = pipe.config.resolved_internal_token()  # RayPipeline made one if none was configured
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return lambda: stub.Stats(common_pb2.StatsRequest(), metadata=metadata).values["kv_bytes_fetched"]


# -- the run -------------------------------------------------------------------------------------
class Bench:
    """Both sides and what they measured: each method runs the in-process side, then the pipeline."""

    def __init__(self, args, windows: Windows, engine: AsyncEngine, loop: asyncio.Runner, client: Client,
                 aclient: AsyncClient, kv_bytes_fetched: Callable[[], float] | None):
        self.args, self.windows, self.engine, self.loop = args, windows, engine, loop
        self.client, self.aclient, self.kv_bytes_fetched = client, aclient, kv_bytes_fetched
        self.rng = random.Random(0)
        self.results: dict[str, dict[str, list]] = {}  # metric -> side -> one value a round (gaps: pooled)

    def record(self, metric: str, side: str, *values) -> None:
        self.results.setdefault(metric, {"in-process": [], "pipeline": []})[side].extend(values)

    def warm_up(self) -> None:
        """First calls open channels and thread pools and touch the KV pools, on both sides."""
        prompt = self.windows.take(self.args.prompt_tokens)
        self.loop.run(engine_request(self.engine, prompt, 4))
        blocking_request(self.client, prompt, 4)
        self.loop.run(client_request(self.aclient, prompt, 4))

    def batch1(self) -> None:
        prompt, max_tokens = self.windows.take(self.args.prompt_tokens), self.args.max_tokens
        for side, trace in (("in-process", self.loop.run(engine_request(self.engine, prompt, max_tokens))),
                            ("pipeline", blocking_request(self.client, prompt, max_tokens)[0])):
            self.record("batch-1 TTFT (ms)", side, 1e3 * trace.ttft)
            self.record("batch-1 ITL mean (ms)", side, 1e3 * statistics.mean(trace.gaps))
            self.record("batch-1 gap tok 1->2 (ms)", side, 1e3 * trace.gaps[0])  # disaggregated: the KV fetch
            self.record("gaps", side, *trace.gaps)

    def concurrent(self) -> None:
        lo, hi = self.args.concurrent_prompt_tokens
        prompts = [self.windows.take(self.rng.randint(lo, hi)) for _ in range(self.args.concurrency)]
        metric, max_tokens = f"aggregate tok/s @{self.args.concurrency}", self.args.max_tokens
        self.record(metric, "in-process", self.loop.run(tokens_per_s(engine_request, self.engine, prompts, max_tokens)))
        self.record(metric, "pipeline", self.loop.run(tokens_per_s(client_request, self.aclient, prompts, max_tokens)))

    def kv_handoff(self) -> None:
        for length in self.args.kv_prompt_tokens:
            prompt, per_1k = self.windows.take(length), 1000 / length
            ttft = self.loop.run(engine_request(self.engine, prompt, KV_MAX_TOKENS)).ttft
            self.record(f"prefill s / 1k tok ({length})", "in-process", per_1k * ttft)
            before = self.kv_bytes_fetched()
            _, timings = blocking_request(self.client, prompt, KV_MAX_TOKENS)
            fetched = self.kv_bytes_fetched() - before
            self.record(f"prefill s / 1k tok ({length})", "pipeline", per_1k * timings.prefill)
            self.record(f"KV transfer s / 1k tok ({length})", "pipeline", per_1k * timings.kv_transfer)
            self.record(f"KV MB / 1k tok ({length})", "pipeline", per_1k * fetched / 1e6)

    def print_round(self, index: int) -> None:
        print(f"round {index + 1}/{self.args.rounds} (in-process | pipeline)", flush=True)
        for metric, sides in self.results.items():
            if metric != "gaps":
                print(f"  {metric:34s} " + " | ".join(f"{v[-1]:.3f}" if v else "—" for v in sides.values()))


def run(args) -> dict[str, dict[str, list]]:
    llm = tandem.LLM(progress=False, kv_cache_memory=KV_CACHE_MEMORY)
    windows = Windows(llm.tokenize(SHAKESPEARE.read_text()))
    engine = AsyncEngine(llm.engine)
    pipe = start_pipeline(args)
    print(f"pipeline up: {args.launcher}, {args.mode}, gateway {pipe.address}", flush=True)
    try:
        with asyncio.Runner() as loop, Client(pipe.address) as client:
            disaggregated = args.mode == "disaggregated"
            bench = Bench(args, windows, engine, loop, client, AsyncClient(pipe.address),
                          kv_bytes_counter(pipe) if disaggregated else None)
            bench.warm_up()
            for r in range(args.rounds):
                bench.batch1()
                bench.concurrent()
                if disaggregated:
                    bench.kv_handoff()
                bench.print_round(r)
            loop.run(bench.aclient.close())
    finally:
        pipe.stop()
        engine.shutdown()
    return bench.results


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: dict[str, dict[str, list]]) -> dict[str, dict]:
    """metric -> {"in-process", "pipeline", "ratio"} (medians over rounds; ratio pipeline / in-process)."""
    rows = {}
    gaps = results["gaps"]
    for metric, sides in results.items():
        if metric == "gaps":
            continue
        rows[metric] = {side: statistics.median(v) if v else None for side, v in sides.items()}
        if metric == "batch-1 ITL mean (ms)":  # the pooled gaps of every round, next to their mean
            for q in (50, 99):
                rows[f"batch-1 ITL p{q} (ms)"] = {side: 1e3 * percentile(g, q) for side, g in gaps.items()}
    for row in rows.values():
        row["ratio"] = row["pipeline"] / row["in-process"] if row["in-process"] else None
    return rows


def print_table(rows: dict[str, dict]) -> None:
    fmt = lambda v, spec: f"{'—' if v is None else format(v, spec):>11s}"  # noqa: E731
    print(f"\n{'metric':34s} {'in-process':>11s} {'pipeline':>11s} {'ratio':>11s}")
    for metric, row in rows.items():
        print(f"{metric:34s} {fmt(row['in-process'], '.3f')} {fmt(row['pipeline'], '.3f')} {fmt(row['ratio'], '.2f')}")
    print("ratio = pipeline / in-process (medians over rounds; ITL percentiles over every round's gaps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launcher", choices=("inprocess", "ray"), default="inprocess")
    ap.add_argument("--mode", choices=("disaggregated", "aggregated"), default="disaggregated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disaggregate", choices=("always", "auto", "never"), default="always",
                    help="per-request disaggregation (the config's); always: every request takes the "
                         "hand-off, the shape of the figures before the router decided")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (batch 1 and concurrent)")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="batch-1 prompt length")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--concurrent-prompt-tokens", type=int, nargs=2, default=[50, 150], metavar=("MIN", "MAX"))
    ap.add_argument("--kv-prompt-tokens", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.max_tokens < 2:
        ap.error("--max-tokens must be at least 2: the ITL needs two tokens")
    torch.set_num_threads(args.threads)

    results = run(args)
    rows = summarize(results)
    print_table(rows)
    if args.json:
        rounds = {metric: sides for metric, sides in results.items() if metric != "gaps"}
        payload = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
                   "results": rows, "rounds": rounds}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

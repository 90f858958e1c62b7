"""Per-request disaggregation (issue 16 item 5): the `disaggregate` policies side by side, one run.

Four pipelines, started in turn in this process (InProcessPipeline, default model, fp32), each
given the same mixed workload by `tandem bench`'s runner (tandem.benchmark, `--dataset mixed`):
short chat turns (SQuAD questions, 5-30 tokens) and long documents (windows of the Shakespeare
that ships with tandem), Poisson arrivals, greedy, EOS ignored:

    auto        mode disaggregated, disaggregate: auto   (1 prefill + 1 decode worker)
    always      mode disaggregated, disaggregate: always (every request through the KV hand-off)
    never       mode disaggregated, disaggregate: never  (the decode worker runs everything)
    aggregated  mode aggregated, 2 workers               (each runs whole requests)

Every pipeline has two workers of `--threads` torch threads each, so all four use the same cores.
Reported per pipeline: TTFT p50/p99 over all requests and over short and long prompts apart, ITL
p50/p99, output tokens/s, requests/s, and the share of requests each route took (usage).

--calibrate measures the constants behind services.routing's defaults instead, on an idle
disaggregated pipeline: per prompt length, the TTFT of `always` and of `never` (medians of
--reps), the prefill worker's seconds and the KV hand-off's, and the stall a prompt run whole on
the decode worker puts in a stream already decoding there (its longest gap between tokens).

    .venv/bin/python bench/disaggregate.py [--num-prompts 40] [--request-rate 0.5] [--json PATH]
    .venv/bin/python bench/disaggregate.py --calibrate
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np

from tandem.benchmark.config import BenchConfig
from tandem.benchmark.runner import run_benchmark
from tandem.data import SHAKESPEARE
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import Client
from tandem.services.config import PipelineConfig

KV_CACHE_MEMORY = 256 << 20  # per worker: ~5.8k tokens of the default model's fp32 KV
SHORT_TOKENS = 64  # the report's split: prompts below this are chat turns (the questions are < 40)
PIPELINES = {"auto": dict(disaggregate="auto"), "always": dict(disaggregate="always"),
             "never": dict(disaggregate="never"),
             "aggregated": dict(mode="aggregated", replicas={"decode": 2})}
CALIBRATION_LENGTHS = (16, 32, 64, 128, 256, 512)


def pipeline_config(threads: int, **overrides) -> PipelineConfig:
    return PipelineConfig(grpc_port=0, http_port=None, num_threads=threads, kv_cache_memory=KV_CACHE_MEMORY,
                          **overrides)


def summary(result) -> dict:
    m = result.measurements[0]
    records = [r for r in m.records if r.success]

    def pct(values: list[float], p: float) -> float | None:
        return float(np.percentile(np.asarray(values) * 1000, p)) if values else None

    short = [r.ttft for r in records if r.prompt_len < SHORT_TOKENS]
    long = [r.ttft for r in records if r.prompt_len >= SHORT_TOKENS]
    itl = [gap for r in records for gap in r.itl]
    x = m.metrics
    return {"completed": x["completed"], "failed": x["failed"], "num_short": len(short), "num_long": len(long),
            "ttft_p50_ms": x["median_ttft_ms"], "ttft_p99_ms": x["p99_ttft_ms"],
            "short_ttft_p50_ms": pct(short, 50), "short_ttft_p99_ms": pct(short, 99),
            "long_ttft_p50_ms": pct(long, 50), "long_ttft_p99_ms": pct(long, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "output_tok_s": x["output_throughput"], "req_s": x["request_throughput"],
            "disaggregated_fraction": x["disaggregated_fraction"], "duration_s": x["duration"]}


def compare(args) -> dict:
    results = {}
    for name, overrides in PIPELINES.items():
        started = time.perf_counter()
        with InProcessPipeline(pipeline_config(args.threads, **overrides)) as pipe:
            bench = BenchConfig(target=pipe.address, dataset="mixed", long_fraction=args.long_fraction,
                                num_prompts=args.num_prompts, num_warmups=args.warmups, input_len=args.input_len,
                                output_len=args.output_len, request_rates=[args.request_rate], seed=args.seed,
                                progress=False, result_file="/dev/null", plot="/dev/null")
            results[name] = summary(run_benchmark(bench, log=lambda line: None))
        results[name]["wall_s"] = time.perf_counter() - started
        print(name, json.dumps(results[name]), flush=True)
    return results


def print_table(results: dict) -> None:
    def ms(v):
        return "-" if v is None else f"{v:,.0f}"

    print("\n| pipeline | TTFT p50 / p99 (ms) | chat turns TTFT p50 / p99 | documents TTFT p50 / p99 "
          "| ITL p50 / p99 (ms) | out tok/s | req/s | disaggregated |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        share = "-" if r["disaggregated_fraction"] is None else f"{100 * r['disaggregated_fraction']:.0f}%"
        print(f"| {name} | {ms(r['ttft_p50_ms'])} / {ms(r['ttft_p99_ms'])} | {ms(r['short_ttft_p50_ms'])} / "
              f"{ms(r['short_ttft_p99_ms'])} | {ms(r['long_ttft_p50_ms'])} / {ms(r['long_ttft_p99_ms'])} | "
              f"{ms(r['itl_p50_ms'])} / {ms(r['itl_p99_ms'])} | {r['output_tok_s']:.1f} | {r['req_s']:.3f} | "
              f"{share} |")


# -- calibration ---------------------------------------------------------------------------------
def calibrate(args) -> dict:
    text = SHAKESPEARE.read_text()
    out = {}
    with InProcessPipeline(pipeline_config(args.threads, disaggregate="auto")) as pipe, \
            Client(pipe.address, timeout=300) as client:
        ids = client.tokenize(text[:80000], add_special_tokens=False)  # ~20k tokens: fresh text throughout
        client.complete(ids[:32], max_tokens=2, disaggregate="always")  # warm both workers
        client.complete(ids[32:64], max_tokens=2, disaggregate="never")
        offset = 64
        for length in CALIBRATION_LENGTHS:
            rows = {"always": [], "never": []}
            for _ in range(args.reps):
                for policy in ("always", "never"):
                    prompt = ids[offset:offset + length]  # fresh text: no cache holds it
                    offset += length
                    got = client.complete(prompt, max_tokens=4, temperature=0, ignore_eos=True, disaggregate=policy)
                    rows[policy].append((got.timings.ttft, got.timings.prefill, got.timings.kv_transfer))
            stall = decode_stall(client, ids[offset:offset + length], ids[offset + length:offset + length + 16])
            offset += length + 16
            med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
            out[length] = {"ttft_always_s": med(rows["always"], 0), "ttft_never_s": med(rows["never"], 0),
                           "prefill_s": med(rows["always"], 1), "kv_transfer_s": med(rows["always"], 2),
                           "decode_stall_s": stall}
            print(length, json.dumps(out[length]), flush=True)
    return out


def decode_stall(client: Client, prompt: list[int], background: list[int]) -> float:
    """The longest gap between tokens of a stream decoding on the decode worker while `prompt` is
    run whole there, minus its usual gap."""
    times: list[float] = []

    def stream():
        for chunk in client.generate(background, max_tokens=60, temperature=0, ignore_eos=True,
                                     disaggregate="never"):
            if chunk.token_ids:
                times.append(time.perf_counter())

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    while len(times) < 10 and thread.is_alive():
        time.sleep(0.01)
    client.complete(prompt, max_tokens=1, disaggregate="never")
    thread.join()
    gaps = np.diff(times)
    return float(gaps.max() - np.median(gaps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibrate", action="store_true", help="measure the policy's constants instead")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1; 2 workers)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--warmups", type=int, default=2)
    p.add_argument("--request-rate", type=float, default=0.5, help="requests/s, Poisson (default: 0.5)")
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--input-len", type=int, default=512, help="a long document's tokens (default: 512)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="--calibrate: requests per length and policy")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    results = calibrate(args) if args.calibrate else compare(args)
    if not args.calibrate:
        print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

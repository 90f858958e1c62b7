"""What each parallel layout costs the engine on this machine: tandem.LLM split over ranks
(spawned processes over gloo, torch threads split evenly over the cores) against one rank, for the
default model: batch-1 decode, 16 concurrent requests, and the first token of a 256-token prompt;
with the share of rank 0's wall time spent in collectives (the step broadcast, all-gathers,
sends and receives: the rest is computing and Python), and each rank's weights.

    .venv/bin/python bench/parallel_engine.py [--json bench/parallel_engine.json]

Dequantized fp32 throughout (tensor parallelism splits plain weights), plus the GGUF's blocks
kept under pipeline parallelism 2 against one rank with blocks. On 2 cores a split can only lose:
the ranks share the same two cores. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import tandem
from parallel import timed_collectives  # bench/parallel.py, beside this script

LAYOUTS = [("one rank", "none", {}), ("tensor 3", "none", dict(tensor_parallel_size=3)),
           ("pipeline 2", "none", dict(pipeline_parallel_size=2)), ("pipeline 3", "none", dict(pipeline_parallel_size=3)),
           ("tensor 3 x pipeline 2", "none", dict(tensor_parallel_size=3, pipeline_parallel_size=2)),
           ("one rank, GGUF blocks", None, {}), ("pipeline 2, GGUF blocks", None, dict(pipeline_parallel_size=2))]
PROMPT = "The history of the printing press begins"


def _measure(llm: tandem.LLM, spent: list[float]) -> dict:
    greedy = tandem.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(PROMPT, tandem.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm
    mark, start = len(spent), time.perf_counter()
    out = llm.generate(PROMPT + " and", greedy)[0]
    wall = time.perf_counter() - start
    decode = (len(out.token_ids) - 1) / (out.metrics.finished_time - out.metrics.first_token_time)
    batch1_comm = sum(spent[mark:]) / wall
    prompts = [f"{PROMPT} ({i})" for i in range(16)]
    start = time.perf_counter()
    outs = llm.generate(prompts, tandem.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    aggregate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    long_prompt = list(range(1000, 1256))
    start = time.perf_counter()
    llm.generate([long_prompt], tandem.SamplingParams(temperature=0, max_tokens=1))
    ttft = time.perf_counter() - start
    return {"batch1_tok_s": decode, "batch1_collective_share": batch1_comm, "c16_tok_s": aggregate,
            "ttft256_s": ttft,
            "rank0_weight_bytes": sum(t.numel() * t.element_size()  # GGUF blocks are buffers
                                      for t in (*llm.model.parameters(), *llm.model.buffers()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="layouts to run (the others are read from --json)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    spent: list[float] = []
    timed_collectives(spent, ("broadcast", "all_gather", "all_reduce", "send", "recv", "barrier"))
    rows = json.loads(args.json.read_text())["layouts"] if args.only and args.json and args.json.exists() else {}
    for name, quantization, layout in LAYOUTS:
        if args.only and name not in args.only:
            continue
        world = max(layout.get("tensor_parallel_size", 1), 1) * layout.get("pipeline_parallel_size", 1)
        threads = max(1, cores // world)
        start = time.perf_counter()
        with tandem.LLM("smollm2-135m", progress=False, quantization=quantization, num_kv_blocks=256,
                        num_threads=threads, parallel_backend="mp", **layout) as llm:
            ready = time.perf_counter() - start
            rows[name] = {**_measure(llm, spent), "ranks": world, "threads_per_rank": threads, "start_s": ready}
        print(name, rows[name], flush=True)
    print("\n| layout | ranks x threads | batch-1 tok/s | vs one rank | in collectives (rank 0, batch 1) | "
          "16 requests tok/s | vs one rank | TTFT 256 tokens | rank 0 weights | ready in |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        base = rows["one rank, GGUF blocks" if "GGUF" in name else "one rank"]
        print(f"| {name} | {r['ranks']} x {r['threads_per_rank']} | {r['batch1_tok_s']:.1f} | "
              f"{r['batch1_tok_s'] / base['batch1_tok_s']:.2f}x | {100 * r['batch1_collective_share']:.0f}% | "
              f"{r['c16_tok_s']:.1f} | {r['c16_tok_s'] / base['c16_tok_s']:.2f}x | {r['ttft256_s'] * 1e3:.0f} ms | "
              f"{r['rank0_weight_bytes'] / 2**20:.0f} MiB | {r['start_s']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "layouts": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where an engine step's time goes: torch's profiler over greedy decoding at a given batch size,
ops grouped, plus the share of the step outside torch ops (Python: scheduling, metadata, sampling).

    .venv/bin/python bench/profile_engine.py [--batch 1] [--tokens 32] [--threads 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import tandem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    llm = tandem.LLM(args.model, dtype=args.dtype, num_threads=args.threads, progress=False)
    params = tandem.SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompts = [llm.tokenize(f"Request {i}: once upon a time") for i in range(args.batch)]
    llm.generate(prompts, params)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"batch {args.batch}: {args.batch * args.tokens / wall:.1f} tokens/s, wall {wall:.2f} s, "
          f"in torch ops {in_ops:.2f} s ({in_ops / wall:.0%}), outside (Python) {1 - in_ops / wall:.0%}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

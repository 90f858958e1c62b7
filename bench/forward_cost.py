"""What verifying k guesses costs on this CPU: one forward of the default model over 1 + k new
tokens of a single sequence (500 tokens of context), and the linear layer alone at M rows
(F.linear, MKL's packed GEMM where available). Speculative decoding pays only when a round's
accepted guesses outweigh the extra cost of its wider forward.

    .venv/bin/python bench/forward_cost.py [--threads 2] [--reps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tandem
from tandem.data import SHAKESPEARE


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def forward_costs(reps: int, extras=(0, 1, 2, 5, 8)) -> dict[int, float]:
    llm = tandem.LLM(progress=False, kv_cache_memory=256 << 20)
    engine = llm.engine
    engine.add_request("ctx", llm.tokenize(SHAKESPEARE.read_text()[:3000])[:500],
                       tandem.SamplingParams(temperature=0, max_tokens=1 << 14, ignore_eos=True))
    engine.step()  # the 500-token prompt is now in the KV cache
    seq = engine.requests["ctx"].seqs[0]

    def forward(extra: int) -> None:  # run 1 + extra tokens at the end of the context, then undo them
        seq.token_ids.extend([5] * extra)
        copies = engine.block_manager.append_slots(seq, 1 + extra)
        engine.runner.execute([(seq, 1 + extra)], copies, [0], num_rows=[1 + extra])
        del seq.token_ids[len(seq.token_ids) - extra:]
        engine.block_manager.trim(seq)

    return {1 + e: median_ms(lambda: forward(e), reps) for e in extras}


def linear_costs(reps: int, rows=(1, 2, 6, 16)) -> dict[int, tuple[float, float | None]]:
    weight = torch.randn(1536, 576)  # the default model's gate/up projection
    out = {}
    for m in rows:
        x = torch.randn(m, 576)
        plain = median_ms(lambda: torch.nn.functional.linear(x, weight), reps * 10) * 1e3
        try:
            packed_w = torch.ops.mkl._mkl_reorder_linear_weight(weight, m)
            packed = median_ms(lambda: torch.ops.mkl._mkl_linear(x, packed_w, weight, None, m), reps * 10) * 1e3
        except (AttributeError, RuntimeError):
            packed = None
        out[m] = (plain, packed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("new tokens  forward ms  vs 1 token")
    costs = forward_costs(args.reps)
    for n, ms in costs.items():
        print(f"{n:>10}  {ms:>10.1f}  {ms / costs[1]:>8.2f}x")
    print("\nrows M  F.linear us  MKL packed us   (1536 x 576 fp32)")
    for m, (plain, packed) in linear_costs(args.reps).items():
        print(f"{m:>6}  {plain:>11.0f}  {'-' if packed is None else f'{packed:.0f}':>13}")


if __name__ == "__main__":
    main()

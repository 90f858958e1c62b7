"""Quantization benchmark: quality and speed of each quantizer plugin against fp32, in one run.

Quality: teacher-forced perplexity of the default model on the first 4,096 tokens of
tandem/data/tinyshakespeare.txt (the same window as bench/fidelity.py), relative to fp32,
plus top-1 agreement with fp32's argmax. Speed: batch-1 greedy decode through the engine (a
128-token prompt, 128 new tokens, EOS ignored), tokens/s of the decode phase. The fp32, int8 and
int4 models are loaded side by side and measured in interleaved rounds (fp32, int8, int4, fp32,
...), so machine noise hits all of them alike; each figure is the median of the rounds and the
speed-up is the ratio of medians.

    .venv/bin/python bench/quant.py [--threads 2] [--tokens 4096] [--json bench/quant.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from pathlib import Path

import torch

import tandem
from tandem.data import SHAKESPEARE


# (label, LLM keyword arguments)
CONFIGS = [
    ("fp32", {"quantization": "none"}),
    ("gguf blocks (default)", {}),
    ("int8", {"quantization": "int8"}),
    ("int4 g32", {"quantization": "int4", "quantization_options": {"group_size": 32}}),
    ("int4 g64", {"quantization": "int4", "quantization_options": {"group_size": 64}}),
    ("nf4", {"quantization": "nf4"}),
    ("nf4, no working copy", {"quantization": "nf4", "quantization_options": {"working_copy": False}}),
    ("fp8", {"quantization": "fp8"}),
    ("fp8, no working copy", {"quantization": "fp8", "quantization_options": {"working_copy": False}}),
    ("fp32 + int8 KV", {"quantization": "none", "kv_cache_dtype": "int8"}),
]
SPEED_LABELS = ("fp32", "gguf blocks (default)", "int8", "int4 g32", "nf4", "fp8")


def perplexity(llm: tandem.LLM, tokens: list[int]) -> tuple[float, list[int]]:
    if llm.engine.runner.k_pools and type(llm.engine.runner.k_pools[0]).__name__ != "DenseKVPool":
        return engine_perplexity(llm, tokens)
    scores = llm.score(tokens)
    return scores.perplexity, scores.argmax_ids


def engine_perplexity(llm: tandem.LLM, tokens: list[int]) -> tuple[float, list[int]]:
    """Perplexity through the engine's paged (here: int8) KV cache: chunked prefill in 512-token
    chunks, each chunk attending over the quantized KV of the ones before it. `score` would keep
    its own fp32 cache, so a KV format has to be measured this way."""
    from tandem.engine.sequence import Sequence

    engine, runner = llm.engine, llm.engine.runner
    seq = Sequence("ppl", list(tokens), len(tokens), tandem.SamplingParams())
    engine.block_manager.allocate(seq)
    logprobs, argmax = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(tokens) - 1, 512):
                num = min(512, len(tokens) - 1 - start)
                seq.num_computed_tokens = start
                hidden_rows = _chunk_logits(runner, seq, num)
                targets = torch.tensor(tokens[start + 1:start + 1 + num])
                logprobs += hidden_rows.log_softmax(-1).gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
                argmax += hidden_rows.argmax(-1).tolist()
    finally:
        engine.block_manager.release(seq)
    return math.exp(-sum(logprobs) / len(logprobs)), argmax


def _chunk_logits(runner, seq, num: int) -> torch.Tensor:
    from tandem.engine.paged_attention import PagedAttention, build_metadata

    start = seq.num_computed_tokens
    meta = build_metadata([(seq.block_table, start, num)], runner.block_size, runner.variant, runner.config.num_heads)
    attention = PagedAttention(runner.k_pools, runner.v_pools, meta, runner.variant, runner.backend)
    ids = torch.tensor([seq.token_ids[start:start + num]])
    positions = torch.arange(start, start + num).unsqueeze(0)
    return runner.model.compute_logits(runner.model(ids, positions, attention)[0])


def decode_speed(llm: tandem.LLM, prompt: list[int], new_tokens: int) -> float:
    params = tandem.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt[:16], tandem.SamplingParams(temperature=0, max_tokens=4))  # warm-up
    out = llm.generate(prompt, params)[0]
    m = out.metrics
    return (len(out.token_ids) - 1) / (m.finished_time - m.first_token_time)


def speed_phase(rounds: int, decode_tokens: int) -> dict[str, float]:
    llms = {label: tandem.LLM(progress=False, kv_cache_memory=256 << 20, **dict(CONFIGS)[label])
            for label in SPEED_LABELS}
    prompt = next(iter(llms.values())).tokenize(SHAKESPEARE.read_text())[1000:1128]
    times: dict[str, list[float]] = {label: [] for label in llms}
    for _ in range(rounds):
        for label, llm in llms.items():
            times[label].append(decode_speed(llm, prompt, decode_tokens))
            print(f"  {label:10s} {times[label][-1]:.1f} tok/s", flush=True)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results, reference = {}, None
    for label, options in CONFIGS:
        if args.only and label not in args.only and label != "fp32":
            continue
        llm = tandem.LLM(progress=False, kv_cache_memory=256 << 20, **options)
        tokens = llm.tokenize(SHAKESPEARE.read_text())[:args.tokens]
        ppl, argmax = perplexity(llm, tokens)
        weights = list(llm.model.parameters()) + list(llm.model.buffers())  # packed + working copies
        row = {"perplexity": ppl, "weight_mib": sum(t.numel() * t.element_size() for t in weights) / 2 ** 20}
        if reference is None:
            reference = (ppl, argmax)
        row["ppl_vs_fp32"] = ppl / reference[0] - 1
        row["top1_vs_fp32"] = sum(a == b for a, b in zip(argmax, reference[1])) / len(argmax)
        results[label] = row
        print(f"{label:16s} " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
        del llm
        gc.collect()
    speeds = speed_phase(args.rounds, args.decode_tokens)
    for label, speed in speeds.items():
        results.setdefault(label, {})["decode_tok_s"] = speed
        results[label]["decode_speedup_vs_fp32"] = speed / speeds["fp32"]
        print(f"{label:16s} batch-1 decode {speed:.1f} tok/s = {speed / speeds['fp32']:.2f}x fp32")
    if args.json:
        payload = {"threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
                   "torch": torch.__version__, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

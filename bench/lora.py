"""What LoRA adapters cost on the default model: the bytes 8 loaded adapters add to the process
against their weights' own bytes, and a batch of 16 requests spread over 4 adapters against the
same batch on the bare base (greedy, 32 tokens each, one generate call each, alternating rounds).
The adapters are random, rank 16, on all seven projections, written in PEFT's format.

    .venv/bin/python bench/lora.py [--rounds 3] [--json bench/lora.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


import tandem
from tandem.model.lora import write_random_adapter


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = tandem.LLM("smollm2-135m", progress=False, num_kv_blocks=8).config
        paths, weight_bytes = {}, 0
        for i in range(8):
            paths[f"a{i}"] = Path(tmp) / f"a{i}"
            weight_bytes += write_random_adapter(paths[f"a{i}"], config, rank=16, seed=i)
        llm = tandem.LLM("smollm2-135m", progress=False, num_kv_blocks=1024, max_loras=8, max_lora_rank=16)
        before = rss()
        for name, path in paths.items():
            llm.load_lora(name, str(path))
        added = rss() - before
        greedy = tandem.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        prompts = [f"Story number {i}: once upon a time" for i in range(16)]
        adapters = [f"a{i % 4}" for i in range(16)]
        llm.generate(prompts[:2], greedy, lora=adapters[:2])  # warm: slots written, kernels built
        llm.generate(prompts[:2], greedy)
        base_t, lora_t = [], []
        for _ in range(args.rounds):
            for times, lora in ((base_t, None), (lora_t, adapters)):
                start = time.perf_counter()
                outs = llm.generate(prompts, greedy, lora=lora)
                times.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
    base, mixed = sorted(base_t)[len(base_t) // 2], sorted(lora_t)[len(lora_t) // 2]
    result = {"adapter_weight_bytes": weight_bytes, "rss_added_bytes": added,
              "slot_buffer_bytes": sum(b.numel() * b.element_size() for n, b in llm.model.named_buffers()
                                       if "lora_" in n),
              "base_tok_s": base, "mixed_4_adapters_tok_s": mixed, "ratio": mixed / base,
              "rounds": {"base": base_t, "mixed": lora_t}}
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Engine benchmark: the same workload through tandem and its peers, side by side in one run.

tandem runs its defaults (the GGUF's Q4_1/Q8_0 blocks kept, tandem's CPU kernels; `--quantization
none` for the dequantized fp32 model). Peers (optional; each is skipped with a note when missing):
- llama.cpp via llama-cpp-python on the same GGUF, same thread count, built from source with
  -march=native by bench/peers/build_llama_cpp.sh into --llama-dir (its libraries are loaded from
  there). Its Python API serves one sequence at a time, so "N concurrent" requests run one after
  another there; llama.cpp's own continuous-batching server is in bench/serving_peers.py.
- HF transformers on the same GGUF (it dequantizes to fp32), static batches with left padding
  through `generate`.

Batch-1 decode and the 512-token TTFT are measured --repeat times per engine, the engines
alternating round by round, and the median is reported (every round is in the JSON).

Prompts are token-id windows of the Shakespeare that ships with tandem (tandem/data, 250 KB),
identical for every engine; generation is greedy with EOS ignored, so every engine produces exactly
the same count. (Runs before 2026-11-30 drew the windows from the first 400,000 characters of the
full 1 MB text: other passages of the same lengths.)

    .venv/bin/python bench/engine.py [--threads 2] [--quantization none] [--concurrency 1 4 16 64]
        [--peers llamacpp transformers] [--repeat 3] [--llama-dir build/llama.cpp] [--device cpu|cuda]
        [--json bench/engine.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

import tandem
from tandem.data import SHAKESPEARE
from tandem.engine.llm_engine import LLMEngine


def make_prompts(llm: tandem.LLM, count: int, length: int, seed: int = 0) -> list[list[int]]:
    ids = llm.tokenize(SHAKESPEARE.read_text())
    rng = random.Random(seed)
    return [ids[s:s + length] for s in (rng.randrange(0, len(ids) - length) for _ in range(count))]


# -- tandem ------------------------------------------------------------------------------------
def tandem_run(llm: tandem.LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    params = tandem.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    itls = [x for o in outs for x in o.metrics.inter_token_latencies]
    return {"tokens_per_s": sum(len(o.token_ids) for o in outs) / wall,
            "ttft_s": statistics.mean(o.metrics.ttft for o in outs),
            "itl_s": statistics.mean(itls) if itls else None, "wall_s": wall}


def tandem_warm_prefix(llm: tandem.LLM, prefix_len: int = 1000) -> dict:
    """TTFT of a request whose prefix_len-token prefix is cached vs the same request cold."""
    base = make_prompts(llm, 3, prefix_len + 16, seed=7)
    params = tandem.SamplingParams(temperature=0, max_tokens=1)
    cold = llm.generate(base[0], params)[0].metrics
    warm_prompt = base[0][:prefix_len] + base[1][:16]  # same prefix, a different question
    warm = llm.generate(warm_prompt, params)[0].metrics
    return {"cold_ttft_s": cold.ttft, "warm_ttft_s": warm.ttft, "warm_over_cold": warm.ttft / cold.ttft,
            "warm_cached_tokens": warm.num_cached_tokens}


def tandem_kv_waste(llm: tandem.LLM, num_requests: int = 64, seed: int = 1) -> dict:
    """Allocated KV slots that hold no token of their sequence, over a run of num_requests
    concurrent requests (prompts 32-512 tokens, outputs 16-256 tokens, all submitted at once):
    summed over every step, sum(allocated - held) / sum(allocated)."""
    rng = random.Random(seed)
    engine: LLMEngine = llm.engine
    block_size = engine.block_manager.block_size
    prompts = make_prompts(llm, num_requests, 512, seed=seed)
    for i, prompt in enumerate(prompts):
        params = tandem.SamplingParams(temperature=0, max_tokens=rng.randint(16, 256), ignore_eos=True)
        engine.add_request(f"waste-{i}", prompt[:rng.randint(32, 512)], params)
    allocated = held = peak_running = 0
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        peak_running = max(peak_running, len(running))
        allocated += sum(len(s.block_table) for s in running) * block_size
        held += sum(min(s.num_tokens, len(s.block_table) * block_size) for s in running)
    return {"requests": num_requests, "peak_running": peak_running, "block_size": block_size,
            "waste_fraction": 1 - held / allocated}


# -- llama.cpp ---------------------------------------------------------------------------------
def llamacpp_engine(model_path: Path, threads: int, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False), llama_cpp.__version__


def llamacpp_run(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    ttfts, itls, total = [], [], 0
    started = time.perf_counter()
    for prompt in prompts:
        llm.reset()
        t0 = time.perf_counter()
        times = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == max_tokens:
                break
        ttfts.append(times[0] - t0)
        itls += [b - a for a, b in zip(times, times[1:])]
        total += len(times)
    wall = time.perf_counter() - started
    return {"tokens_per_s": total / wall, "ttft_s": statistics.mean(ttfts),
            "itl_s": statistics.mean(itls) if itls else None, "wall_s": wall}


# -- HF transformers ---------------------------------------------------------------------------
def transformers_engine(model_path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    return model.eval(), __import__("transformers").__version__


@torch.inference_mode()
def transformers_run(model, prompts: list[list[int]], max_tokens: int) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - started
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - started - ttft
    del first
    return {"tokens_per_s": len(prompts) * (out.shape[1] - width) / wall, "ttft_s": ttft,
            "itl_s": wall / max_tokens, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--peers", nargs="*", default=["llamacpp", "transformers"])
    parser.add_argument("--quantization", default=None, help="tandem's (default: its default, GGUF blocks kept)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of the batch-1 and TTFT measurements")
    parser.add_argument("--llama-dir", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "llama.cpp")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: tandem on the GPU with its Triton kernels "
                        "(attention_backend triton); reported as unmeasured when no GPU is at hand")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"device": args.device, "unmeasured": "no GPU is visible to torch on this machine"}))
        if args.json:
            args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                             "unmeasured": "no GPU is visible to torch on this machine"}, indent=2) + "\n")
        return
    gpu = {"device": args.device, "attention_backend": "triton"} if args.device.startswith("cuda") else {}

    if (args.llama_dir / "build" / "bin").is_dir():  # llama-cpp-python installed with LLAMA_BUILD=OFF
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(args.llama_dir / "build" / "bin"))
    torch.set_num_threads(args.threads)
    llm = tandem.LLM(args.model, dtype=args.dtype, num_threads=args.threads, progress=False,
                     quantization=args.quantization, **gpu)
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "tandem": {}, "peers": {}}
    engines = {"tandem": lambda prompts, n: tandem_run(llm, prompts, n)}
    if "llamacpp" in args.peers:
        try:
            cpp, version = llamacpp_engine(llm.model_path, args.threads, 1024)
            engines[f"llama.cpp {version}"] = lambda prompts, n: llamacpp_run(cpp, prompts, n)
        except ImportError:
            results["peers"]["llama.cpp"] = "not installed (pip install -e '.[bench]')"
    if "transformers" in args.peers:
        try:
            hf, version = transformers_engine(llm.model_path)
            engines[f"transformers {version}"] = lambda prompts, n: transformers_run(hf, prompts, n)
        except ImportError as exc:
            results["peers"]["transformers"] = f"not available ({exc})"

    results["tandem_quantization"] = llm.quantization
    rounds: dict[str, dict[str, list]] = {name: {"ttft_512_s": [], "batch1_decode_tokens_per_s": []} for name in engines}
    for name, run in engines.items():
        run(make_prompts(llm, 1, 16, seed=9), 4)  # warm-up
    for r in range(args.repeat):  # engines alternate, so a slow patch of the machine hits them alike
        # a new text each round: a prompt seen before would be a prefix-cache hit for tandem
        long_prompt, batch1_prompt = make_prompts(llm, 1, 512, seed=100 + r), make_prompts(llm, 1, args.prompt_tokens,
                                                                                             seed=200 + r)
        for name, run in engines.items():
            time.sleep(1)  # the previous engine's worker threads stop spinning before this one starts
            rounds[name]["ttft_512_s"].append(run(long_prompt, 1)["ttft_s"])
            rounds[name]["batch1_decode_tokens_per_s"].append(1 / run(batch1_prompt, args.output_tokens)["itl_s"])
    for name, run in engines.items():
        row = {key: statistics.median(values) for key, values in rounds[name].items()} | {"rounds": rounds[name]}
        for n in args.concurrency:
            time.sleep(1)
            row[f"aggregate_tokens_per_s@{n}"] = run(make_prompts(llm, n, args.prompt_tokens, seed=n),
                                                     args.output_tokens)["tokens_per_s"]
        results["tandem" if name == "tandem" else "peers"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    results["tandem"]["warm_prefix"] = tandem_warm_prefix(llm)
    results["tandem"]["kv_waste"] = tandem_kv_waste(llm)
    results["tandem"]["engine_stats"] = llm.engine.stats()
    print(json.dumps({k: results["tandem"][k] for k in ("warm_prefix", "kv_waste")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

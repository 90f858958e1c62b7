"""Fidelity of tandem against llama.cpp on the same GGUF: teacher-forced perplexity and top-1
agreement over the first 4,096 tokens of tandem/data/tinyshakespeare.txt.

llama.cpp's figures come from running it in the same process when llama-cpp-python is installed
(`pip install -e ".[bench]"`), otherwise from the golden file bench/llamacpp_golden.py wrote
(tests/data/llamacpp_fidelity_golden.json). Either way tandem's tokenization of the text is
checked against llama.cpp's first.

    .venv/bin/python bench/fidelity.py [--model smollm2-135m] [--quantization none] [--dtype float32]
        [--threads 2] [--json OUT]

tandem runs its defaults (a GGUF's Q4_1/Q8_0 blocks multiplied with llama.cpp's arithmetic);
`--quantization none` scores the dequantized float model instead. With the defaults the run also
scores the dequantized model and reports how often the two agree on the argmax (the greedy token).

--emulate-q8-activations rounds every linear layer's input to 8 bits in blocks of 32, as llama.cpp's
CPU path does before its quantized dot products (ggml's Q8_1/Q8_0 `vec_dot_type`). It is a
diagnostic of where the remaining gap comes from, not a tandem feature.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import tandem
from tandem.data import SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "llamacpp_fidelity_golden.json"


REFERENCES = {"f16 KV (llama.cpp default)": 1, "f32 KV": 0}  # name -> llama.cpp ggml_type of the KV cache


def llamacpp_scores(model_path: Path, tokens: list[int], threads: int) -> tuple[dict[str, tuple], str]:
    """{config: (logprobs, argmax)} from llama.cpp, live if importable, else from the golden file."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        golden = json.loads(GOLDEN.read_text())
        if golden["tokens"][:len(tokens)] != tokens:
            raise SystemExit("tandem's tokens differ from the golden file's: tokenizer parity is broken")
        n = len(tokens) - 1
        results = {"f16 KV (llama.cpp default)": (golden["logprobs"][:n], golden["argmax"][:n]),
                   "f32 KV": (golden["kv_f32"]["logprobs"][:n], golden["kv_f32"]["argmax"][:n])}
        return results, f"{golden['source']} (golden file from bench/llamacpp_golden.py)"
    results = {}
    for name, kv_type in REFERENCES.items():
        llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=len(tokens), n_batch=512, logits_all=True,
                              n_threads=threads, verbose=False, type_k=kv_type, type_v=kv_type)
        if llm.tokenize(SHAKESPEARE.read_text()[:40_000].encode(), add_bos=False, special=False)[:len(tokens)] != tokens:
            raise SystemExit("tandem's tokens differ from llama.cpp's: tokenizer parity is broken")
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[:len(tokens) - 1], dtype=np.float32)).double()
        logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
        results[name] = (logprobs.tolist(), logits.argmax(-1).tolist())
    return results, f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (live, same run)"


def round_activations_to_q8(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_1 rounding: per block of 32, scale = amax / 127, round to int8."""
    blocks = x.reshape(-1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-127, 127)
    return (q * scale).reshape(x.shape)


def emulate_q8_activations(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (round_activations_to_q8(args[0]),))
    model.compute_logits = lambda hidden, head=model.lm_head.weight: torch.nn.functional.linear(
        round_activations_to_q8(hidden), head).float()


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--quantization", default=None, help="tandem's (default: its default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--emulate-q8-activations", action="store_true",
                        help="diagnostic: round linear-layer inputs to 8 bits as llama.cpp's CPU path does")
    args = parser.parse_args()

    llm = tandem.LLM(args.model, dtype=args.dtype, num_threads=args.threads, progress=False,
                     quantization=args.quantization)
    if args.emulate_q8_activations:
        emulate_q8_activations(llm.model)
    tokens = llm.tokenize(SHAKESPEARE.read_text()[:40_000])[:args.tokens]
    started = time.perf_counter()
    ours = llm.score(tokens)
    seconds = time.perf_counter() - started
    references, source = llamacpp_scores(llm.model_path, tokens, args.threads)
    result = {"model": args.model, "dtype": args.dtype, "quantization": llm.quantization, "tokens": len(tokens),
              "reference": source,
              "emulate_q8_activations": args.emulate_q8_activations,
              "tandem_perplexity": round(ours.perplexity, 4), "tandem_score_seconds": round(seconds, 2)}
    for name, (ref_logprobs, ref_argmax) in references.items():
        ref_ppl = perplexity(ref_logprobs)
        agreement = sum(a == b for a, b in zip(ours.argmax_ids, ref_argmax)) / len(ref_argmax)
        result[f"llama.cpp {name}"] = {"perplexity": round(ref_ppl, 4),
                                       "tandem_rel_diff": round(ours.perplexity / ref_ppl - 1, 5),
                                       "top1_agreement": round(agreement, 4)}
    if llm.quantization != "none":  # the same text through the dequantized model: greedy agreement
        del llm
        dense = tandem.LLM(args.model, dtype=args.dtype, num_threads=args.threads, progress=False, quantization="none")
        exact = dense.score(tokens)
        result["tandem dequantized"] = {
            "perplexity": round(exact.perplexity, 4), "tandem_rel_diff": round(ours.perplexity / exact.perplexity - 1, 5),
            "top1_agreement": round(sum(a == b for a, b in zip(ours.argmax_ids, exact.argmax_ids)) / len(exact.argmax_ids), 4)}
    for key, value in result.items():
        print(f"{key:34} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

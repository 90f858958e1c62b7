"""Speculative decoding: decode speed with and without it, on the default model, batch 1, greedy.

Two workloads, each request run three ways side by side (no speculation, then each proposer, the
order interleaved per prompt so machine noise hits all alike), outputs checked token-identical:

- quote: a SQuAD paragraph (tandem/data/squad_corpus.json) in the chat template and the request
  to quote it word for word: n-gram prompt lookup's home ground.
- extractive: the paragraph and a question, asking for the answer quoted from the passage (the
  model quotes only part of its answer: a harder case for prompt lookup).
- open: continue a tinyshakespeare excerpt: where a draft model has to guess.

Decode speed = (generated tokens - 1) / (last token time - first token time): prefill excluded.

    .venv/bin/python bench/speculative.py [--prompts 8] [--max-tokens 128] [--k 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tandem
from tandem.data import SHAKESPEARE, SQUAD_CORPUS, SQUAD_QUESTIONS

QUESTION = "\n\nQuestion: {question}\nAnswer by quoting, word for word, the sentence of the passage that answers it."


def extractive_prompts(llm: tandem.LLM, count: int) -> list[list[int]]:
    corpus = {p["id"]: p for p in json.loads(SQUAD_CORPUS.read_text())["paragraphs"]}
    questions = [json.loads(line) for line in SQUAD_QUESTIONS.read_text().splitlines()]
    seen, prompts = set(), []
    for q in questions:
        if q["is_impossible"] or q["paragraph_id"] in seen:
            continue
        seen.add(q["paragraph_id"])
        text = corpus[q["paragraph_id"]]["text"] + QUESTION.format(question=q["question"])
        rendered = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        prompts.append(llm.tokenizer.encode(rendered, parse_special=True))
        if len(prompts) == count:
            break
    return prompts


def quote_prompts(llm: tandem.LLM, count: int) -> list[list[int]]:
    paragraphs = json.loads(SQUAD_CORPUS.read_text())["paragraphs"][:count]
    return [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": p["text"] + "\n\nQuote the passage above, word for word."}]), parse_special=True)
        for p in paragraphs]


def open_prompts(llm: tandem.LLM, count: int) -> list[list[int]]:
    text = SHAKESPEARE.read_text()
    return [llm.tokenize(text[i * 5000:i * 5000 + 600]) for i in range(count)]


def decode_rate(output: tandem.RequestOutput) -> float:
    m = output.metrics
    return (len(output.token_ids) - 1) / (m.token_times[-1] - m.first_token_time)


def run(llm, prompts, methods: dict, max_tokens: int) -> dict:
    rates = {name: [] for name in methods}
    stats = {name: {"proposed": 0, "accepted": 0, "rounds": 0} for name in methods}
    identical = True
    for prompt in prompts:
        outputs = {}
        for name, spec in methods.items():
            params = tandem.SamplingParams(temperature=0, max_tokens=max_tokens, speculative=spec)
            outputs[name] = out = llm.generate([prompt], params)[0]
            rates[name].append(decode_rate(out))
            for key in ("proposed", "accepted", "rounds"):
                stats[name][key] += getattr(out.metrics, f"spec_{key}")
        identical &= all(o.token_ids == outputs["off"].token_ids for o in outputs.values())
    result = {}
    for name in methods:
        s = stats[name]
        result[name] = {
            "decode_tok_s": statistics.median(rates[name]),
            "speedup": statistics.median(r / b for r, b in zip(rates[name], rates["off"])),
            "acceptance_rate": s["accepted"] / s["proposed"] if s["proposed"] else 0.0,
            "mean_accepted_length": s["accepted"] / s["rounds"] if s["rounds"] else 0.0,
        }
    return {"identical_greedy_output": identical, "methods": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="n-gram: most guesses per step (adaptive below it)")
    parser.add_argument("--draft-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = tandem.LLM(progress=False, kv_cache_memory=512 << 20)
    methods = {
        "off": None,
        "ngram": {"method": "ngram", "k": args.k},
        "draft int4": {"method": "draft_model", "k": args.draft_k, "options": {"quantization": "int4"}},
    }
    llm.generate("warm up", tandem.SamplingParams(max_tokens=4, speculative=methods["draft int4"]))
    report = {"args": vars(args), "torch": torch.__version__}
    for workload, prompts in (("quote", quote_prompts(llm, args.prompts)),
                              ("extractive", extractive_prompts(llm, args.prompts)),
                              ("open", open_prompts(llm, args.prompts))):
        start = time.perf_counter()
        report[workload] = run(llm, prompts, methods, args.max_tokens)
        print(f"\n{workload} ({len(prompts)} prompts, {time.perf_counter() - start:.0f} s), identical greedy output: "
              f"{report[workload]['identical_greedy_output']}")
        print(f"{'method':<12} {'decode tok/s':>12} {'speedup':>8} {'accept':>7} {'mean accepted':>14}")
        for name, r in report[workload]["methods"].items():
            print(f"{name:<12} {r['decode_tok_s']:>12.2f} {r['speedup']:>7.2f}x {r['acceptance_rate']:>7.2f} "
                  f"{r['mean_accepted_length']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""H2O eviction (Zhang et al. 2023) against the full cache and a sliding window of the same KV
budget: teacher-forced perplexity of the default model on a long held-out stretch of
tandem/data/tinyshakespeare.txt (from character 150,000 on: past what the tests and the other
benches read), scored through the engine (`LLMEngine.score`) so that every token is scored over
the KV its variant left: the text runs as a prompt through the paged cache, H2O evicting a block
at each block boundary past its budget, the window freeing blocks as it slides.

    .venv/bin/python bench/h2o.py [--tokens 2048] [--budgets 0.25 0.5] [--recent 0.5] [--only h2o]
        [--threads 2] [--json bench/h2o.json]

Per budget B (a fraction of the text's tokens, rounded to whole blocks): h2o (budget B, the last
--recent x B tokens recent and the rest heavy hitters; 0.5 is the paper's even split),
sliding_window (window B) and sinks (4 sink tokens and a window of B - 4: StreamingLLM at the
same number of visible keys); --only NAME runs just the configurations whose name starts so.
Perplexity is reported over every token and over the second half of the text, where every
budget has been evicting for a while.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import tandem
from tandem.data import SHAKESPEARE

TEXT_START = 150_000  # characters: past the first 50,000 the tests and the other benches read


def configs(num_tokens: int, budgets: list[float], recents: list[float],
            block_size: int) -> list[tuple[str, str | None, dict | None]]:
    out = [("full cache", None, None)]
    for fraction in budgets:
        budget = max(2, round(num_tokens * fraction / block_size)) * block_size
        tag = f"{fraction:.0%} ({budget} tokens)"
        for share in recents:
            recent = max(1, round(budget * share / block_size)) * block_size
            out.append((f"h2o {tag}, recent {recent}", "h2o", {"budget": budget, "recent": recent}))
        out += [(f"sliding_window {tag}", "sliding_window", {"window": budget}),
                (f"sinks {tag}", "sinks", {"num_sink": 4, "window": budget - 4})]
    return out


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--recent", type=float, nargs="+", default=[0.5], help="h2o's recent share of the budget")
    parser.add_argument("--only", default=None, help="run only the configurations whose name starts with this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results, tokens = [], None
    for name, attention, options in configs(args.tokens, args.budgets, args.recent, 16):
        if args.only is not None and not name.startswith(args.only):
            continue
        llm = tandem.LLM(args.model, attention=attention, attention_options=options, num_threads=args.threads,
                         progress=False, block_size=16)
        if tokens is None:
            tokens = llm.tokenize(SHAKESPEARE.read_text()[TEXT_START:TEXT_START + 20 * args.tokens])[:args.tokens]
            assert len(tokens) == args.tokens, "the text is too short for --tokens"
        start = time.perf_counter()
        logprobs = llm.engine.score(tokens).logprobs
        half = logprobs[len(logprobs) // 2:]
        row = {"config": name, "attention": llm.variant.describe(), "ppl": perplexity(logprobs),
               "ppl_second_half": perplexity(half), "seconds": time.perf_counter() - start}
        results.append(row)
        print(f"{name:40s} ppl {row['ppl']:8.3f}  second half {row['ppl_second_half']:8.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
        del llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "text_start": TEXT_START, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()

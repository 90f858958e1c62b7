"""What a structured-output constraint costs per token: the default model in-process, the 20 JSON
schemas of tests/data/json_schemas.json, each request alone (batch 1) and all 20 together, with
the constraint against the same requests unconstrained (ignore_eos, the constrained run's token
counts). Also the first request of each schema (its grammar compiled) against a repeat (cached).

    .venv/bin/python bench/structured.py [--json bench/structured.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

import tandem

SCHEMAS = json.loads((Path(__file__).parents[1] / "tests" / "data" / "json_schemas.json").read_text())


def _params(schema: dict | None, tokens: int | None = None) -> tandem.SamplingParams:
    if schema is None:
        return tandem.SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True)
    return tandem.SamplingParams(temperature=1.0, seed=1, max_tokens=300,
                                 logits_processors={"structured_output": {"json_schema": schema}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    llm = tandem.LLM("smollm2-135m", progress=False, num_kv_blocks=1024)
    prompts = [f"Give me a {name.replace('_', ' ')} as JSON:" for name in SCHEMAS]
    llm.generate(prompts[0], _params(None, 8))  # warm
    first, repeat, unparsed = [], [], []
    for prompt, schema in zip(prompts, SCHEMAS.values()):
        for times in (first, repeat):
            start = time.perf_counter()
            out = llm.generate(prompt, _params(schema))[0]
            times.append((time.perf_counter() - start, len(out.token_ids)))
        try:
            jsonschema.validate(json.loads(out.text), schema)
        except (ValueError, jsonschema.ValidationError):  # not JSON, or not the schema
            unparsed.append(out.text)
            print(f"did not parse ({out.finish_reason}, {len(out.token_ids)} tokens): {out.text[:120]!r}...")
    counts = [n for _, n in repeat]
    plain = []
    for prompt, n in zip(prompts, counts):
        start = time.perf_counter()
        llm.generate(prompt, _params(None, n))
        plain.append(time.perf_counter() - start)
    per_token = lambda runs: sum(t for t, _ in runs) / sum(counts)  # noqa: E731
    start = time.perf_counter()
    outs = llm.generate(prompts, [_params(s) for s in SCHEMAS.values()])
    batched = time.perf_counter() - start
    batch_tokens = sum(len(o.token_ids) for o in outs)
    start = time.perf_counter()
    llm.generate(prompts, [_params(None, len(o.token_ids)) for o in outs])
    batched_plain = time.perf_counter() - start
    result = {
        "schemas": len(SCHEMAS), "unparsed": len(unparsed),
        "tokens": sum(counts),
        "batch1_ms_per_token_constrained": 1e3 * per_token(repeat),
        "batch1_ms_per_token_unconstrained": 1e3 * sum(plain) / sum(counts),
        "batch1_ms_per_token_first_request": 1e3 * per_token(first),
        "batch20_tok_s_constrained": batch_tokens / batched,
        "batch20_tok_s_unconstrained": batch_tokens / batched_plain,
    }
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

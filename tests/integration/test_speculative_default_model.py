"""Speculative decoding on the real default model: greedy output is token-identical with every
proposer on and off, one request at a time and batched, and no KV block is left behind."""
from __future__ import annotations

import json

import pytest

import tandem
from tandem.data import SHAKESPEARE, SQUAD_CORPUS

MAX_TOKENS = 40


def prompts(llm) -> list[list[int]]:
    """Chat prompts that quote a SQuAD passage (where prompt lookup finds matches) and plain
    continuations of Shakespeare (where it mostly does not)."""
    corpus = json.loads(SQUAD_CORPUS.read_text())["paragraphs"]
    out = []
    for p in corpus[:6]:
        text = p["text"][:700] + "\n\nRepeat the first sentence of this passage word for word."
        out.append(llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                                        parse_special=True))
    shakespeare = SHAKESPEARE.read_text()
    out += [llm.tokenize(shakespeare[i * 3000:i * 3000 + 400]) for i in range(6)]
    return out


@pytest.fixture(scope="module")
def baseline(default_llm):
    work = prompts(default_llm)
    params = tandem.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return work, [o.token_ids for o in default_llm.generate(work, params)]


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "k": 5},
    {"method": "draft_model", "k": 6, "options": {"quantization": "int4"}},
    {"method": "draft_model", "k": 3, "options": {"quantization": None, "num_layers": 8}},
], ids=["ngram", "draft-int4", "draft-8-layers"])
def test_greedy_output_is_identical(default_llm, baseline, spec):
    """The proposer's options are the server's (the engine's speculative setting); a request
    only turns speculation on with a method and k."""
    work, want = baseline
    llm = tandem.LLM("smollm2-135m", progress=False, speculative=spec) if spec.get("options") else default_llm
    params = tandem.SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                   speculative={"method": spec["method"], "k": spec["k"]})
    batched = llm.generate(work, params)
    assert [o.token_ids for o in batched] == want
    for prompt, expected in zip(work[:4] + work[6:8], want[:4] + want[6:8]):
        assert llm.generate([prompt], params)[0].token_ids == expected
    proposed = sum(o.metrics.spec_proposed for o in batched)
    accepted = sum(o.metrics.spec_accepted for o in batched)
    assert proposed > 0 and accepted > 0
    stats = llm.engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0

"""Per-token logprobs: the engine's (batched, paged, possibly speculative) agree with a teacher-
forced full forward (LLM.score), and the alternatives are the true top-k."""
from __future__ import annotations

import math

import pytest

from tandem import SamplingParams
from tandem.errors import InvalidRequestError
from tests.unit.engine.test_engine import make_llm
from tests.unit.engine.test_speculative import NGRAM, drive, repetitive_prompts

TOLERANCE = 1e-4  # fp32: paged batched attention vs one dense forward


def check_against_score(llm, prompt: list[int], output, k: int) -> None:
    assert output.logprobs is not None and len(output.logprobs) == len(output.token_ids)
    reference = llm.score(prompt + output.token_ids).logprobs[len(prompt) - 1:]
    for lp, want, token in zip(output.logprobs, reference, output.token_ids):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(want, abs=TOLERANCE)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert math.fsum(math.exp(v) for v in values) <= 1 + 1e-5
        if k:  # greedy: the sampled token is the most likely one
            assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-6)


@pytest.mark.parametrize("speculative", [None, NGRAM], ids=["plain", "speculative"])
def test_logprobs_match_a_full_forward(tiny_hf_dir, speculative):
    llm = make_llm(tiny_hf_dir, speculative=speculative)
    prompts = repetitive_prompts(4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outputs = drive(llm.engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        check_against_score(llm, prompt, outputs[f"r{i}"].outputs[0], 3)
    if speculative:
        assert llm.engine.stats()["spec_accepted_tokens"] > 0  # the verified path ran


def test_sampled_tokens_get_their_own_logprob_and_off_means_none(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir)
    prompt = repetitive_prompts(1, seed=3)[0]
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=0, n=2)
    outputs = drive(llm.engine, [("s", prompt, sampled), ("off", prompt, SamplingParams(max_tokens=3))])
    for sample in outputs["s"].outputs:
        check_against_score(llm, prompt, sample, 0)
    assert outputs["off"].outputs[0].logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_bad_logprobs(bad):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=bad)

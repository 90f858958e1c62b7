"""Resuming a request from the tokens it generated elsewhere (LLMEngine.add_request(generated=...)):
what the gateway does when a worker dies mid-stream. The resumed run must continue exactly as the
uninterrupted one: same tokens, penalties over the whole output, max_tokens and stop strings
counted from the real start, seeded draws unchanged, and no block left behind."""
from __future__ import annotations

import random

import pytest

from tandem import SamplingParams
from tandem.errors import InvalidRequestError
from tests.unit.engine.test_disaggregated import run
from tests.unit.engine.test_engine import check, make_llm

PROMPT = random.Random(3).choices(range(3, 300), k=37)


@pytest.fixture(scope="module")
def engines(tiny_hf_dir):
    """(reference, resumer): two engines over the same tiny model."""
    return [make_llm(tiny_hf_dir, block_size=16).engine for _ in range(2)]


def resumed(engine, request_id: str, params: SamplingParams, generated: list[list[int]]):
    out = run(engine, request_id, PROMPT, params, generated=generated)
    check(engine)
    assert engine.stats()["kv_blocks_used"] == 0
    return out


@pytest.mark.parametrize("cut", [5, 17])
def test_greedy_resume_with_penalties_continues_the_same_tokens(engines, cut):
    reference, resumer = engines
    # negative penalties: the tiny random model then repeats its output, so the counts matter
    penalties = dict(presence_penalty=-2.0, frequency_penalty=-1.0, repetition_penalty=1.3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **penalties)
    want = run(reference, f"ref-{cut}", PROMPT, params)
    got = resumed(resumer, f"res-{cut}", params, [want.token_ids[:cut]])
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == "length" and len(got.token_ids) == 24  # max_tokens counts the resumed ones
    # The generated tokens are output, not prompt: as prompt, the penalties would see other counts.
    as_prompt = run(resumer, f"prompt-{cut}", PROMPT + want.token_ids[:cut],
                    SamplingParams(temperature=0, max_tokens=24 - cut, ignore_eos=True, **penalties))
    assert as_prompt.token_ids != want.token_ids[cut:]


def test_a_stop_string_across_the_resume_point_stops_the_same_way(engines):
    reference, resumer = engines
    free = run(reference, "free", PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = free.text[10:14]
    assert stop
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    want = run(reference, "stop-ref", PROMPT, params)
    assert want.finish_reason == "stop" and stop not in want.text
    # cut where the stop string has begun but not finished: its first tokens were already sampled
    cut = next(i for i in range(1, len(want.token_ids))
               if len(resumer.tokenizer.decode(want.token_ids[:i])) > 10)
    got = resumed(resumer, "stop-res", params, [want.token_ids[:cut]])
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "stop")


def test_n_samples_resume_each_unfinished_sample(engines):
    reference, resumer = engines
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=2)
    want = run(reference, "n-ref", PROMPT, params)
    full, partial = want.outputs[0].token_ids, want.outputs[1].token_ids[:4]
    got = resumed(resumer, "n-res", params, [full, partial])
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
    assert [o.finish_reason for o in got.outputs] == ["length", "length"]


def test_a_sample_with_no_tokens_yet_starts_from_the_prompt(engines):
    reference, resumer = engines
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2)
    want = run(reference, "none-ref", PROMPT, params)
    got = resumed(resumer, "none-res", params, [want.outputs[0].token_ids[:3], []])
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]


def test_a_seeded_sampled_request_resumes_with_the_same_draws(engines):
    reference, resumer = engines
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, ignore_eos=True, seed=1234,
                            presence_penalty=0.5)
    want = run(reference, "seed-ref", PROMPT, params)
    for cut in (1, 9):
        got = resumed(resumer, f"seed-res-{cut}", params, [want.token_ids[:cut]])
        assert got.token_ids == want.token_ids, cut


def test_resume_refuses_finished_or_malformed_samples(engines):
    _, resumer = engines
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="nothing to continue"):
        resumer.add_request("done", PROMPT, params, generated=[[5, 6, 7]])
    with pytest.raises(InvalidRequestError, match="one token list per sample"):
        resumer.add_request("two", PROMPT, params, generated=[[5], [6]])
    with pytest.raises(InvalidRequestError, match="prefill_only"):
        resumer.add_request("both", PROMPT, params, generated=[[5]], prefill_only=True)
    assert not resumer.has_unfinished()
    check(resumer)

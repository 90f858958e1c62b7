"""The public in-process API on the tiny model: shapes of results, scoring, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import tandem
from tandem import SamplingParams
from tandem.errors import ConfigError, InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_public_names():
    for name in ("LLM", "SamplingParams", "RequestOutput", "ScoreOutput"):
        assert name in tandem.__all__ and hasattr(tandem, name)


def test_generate_accepts_every_prompt_form(tiny_llm):
    ids = tiny_llm.tokenize("To be or not")
    one_str = tiny_llm.generate("To be or not", GREEDY)
    one_ids = tiny_llm.generate(ids, GREEDY)
    many = tiny_llm.generate(["To be or not", ids, "Other"], GREEDY)
    assert len(one_str) == len(one_ids) == 1 and len(many) == 3
    assert one_str[0].token_ids == one_ids[0].token_ids == many[0].token_ids == many[1].token_ids
    out = many[0]
    assert out.prompt_token_ids == ids and len(out.token_ids) == 8 and out.finish_reason == "length"
    assert out.text == tiny_llm.detokenize(out.token_ids)


def test_per_prompt_params(tiny_llm):
    outs = tiny_llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                          SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [2, 5]
    with pytest.raises(InvalidRequestError, match="list of 2"):
        tiny_llm.generate(["a", "b"], [GREEDY])


def test_greedy_matches_argmax_of_full_forward(tiny_llm):
    """Each greedy token is the argmax of a full (cache-free) forward over everything before it."""
    ids = tiny_llm.tokenize("Now is the winter")
    out = tiny_llm.generate(ids, GREEDY)[0]
    seq = ids + out.token_ids
    with torch.inference_mode():
        logits = tiny_llm.model.compute_logits(
            tiny_llm.model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0)))[0]
    assert logits[len(ids) - 1:-1].argmax(-1).tolist() == out.token_ids


def test_score_equals_full_forward(tiny_llm):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_llm.config.vocab_size, (300,)).tolist()  # spans several chunks if small
    result = tiny_llm.score(ids)
    with torch.inference_mode():
        logits = tiny_llm.model.compute_logits(tiny_llm.model(torch.tensor([ids]), torch.arange(300).unsqueeze(0)))[0]
    logprobs = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert len(result.logprobs) == len(result.argmax_ids) == 299
    torch.testing.assert_close(torch.tensor(result.logprobs), logprobs, atol=1e-4, rtol=1e-4)
    assert result.argmax_ids == logits[:-1].argmax(-1).tolist()
    assert result.perplexity == pytest.approx(math.exp(-logprobs.mean().item()), rel=1e-4)


def test_score_in_chunks_equals_one_pass(tiny_llm, monkeypatch):
    ids = torch.randint(0, tiny_llm.config.vocab_size, (50,)).tolist()
    whole = tiny_llm.score(ids)
    monkeypatch.setattr("tandem.llm.PREFILL_CHUNK", 7)
    chunked = tiny_llm.score(ids)
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=1e-5)


def test_chat(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "Hi"}], GREEDY)
    expected = tiny_llm.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", parse_special=True)
    assert out.prompt_token_ids == expected


@pytest.mark.parametrize("prompt", ["", [], [10**6], [-1], None, 42, b"bytes", [["nested"]]])
def test_bad_prompts(tiny_llm, prompt):
    with pytest.raises(ValueError):
        tiny_llm.generate(prompt, GREEDY)


def test_prompt_longer_than_context(tiny_llm):
    too_long = [5] * tiny_llm.max_model_len
    with pytest.raises(InvalidRequestError, match="context window"):
        tiny_llm.generate(too_long, GREEDY)
    # one token shorter fits, and generation stops at the window
    out = tiny_llm.generate(too_long[:-1], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_bad_prompt_fails_before_any_work(tiny_llm, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_llm.engine, "add_request", lambda *a: calls.append(a))
    with pytest.raises(InvalidRequestError):
        tiny_llm.generate(["fine", ""], GREEDY)
    assert calls == []


def test_bad_constructor_arguments(tiny_hf_dir):
    with pytest.raises(ConfigError, match="dtype"):
        tandem.LLM(str(tiny_hf_dir), dtype="int3", progress=False)
    with pytest.raises(ConfigError, match="max_model_len"):
        tandem.LLM(str(tiny_hf_dir), max_model_len=10**9, progress=False)
    with pytest.raises(ConfigError, match="num_threads"):
        tandem.LLM(str(tiny_hf_dir), num_threads=0, progress=False)


def test_score_bad_input(tiny_llm):
    with pytest.raises(InvalidRequestError):
        tiny_llm.score([1])
    with pytest.raises(InvalidRequestError):
        tiny_llm.score([1] * (tiny_llm.max_model_len + 1))

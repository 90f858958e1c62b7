"""Sampler plugins: the new built-ins (presence/frequency penalties, logit bias) against hand
computations, every built-in through the contract suite, request validation before any work,
and a processor that raises failing only the requests that use it."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import InvalidRequestError
from tandem.plugins import LogitsProcessor, PluginManager
from tandem.plugins.samplers import BUILTIN_PROCESSORS, apply_logit_bias, apply_presence_frequency
from tandem.plugins.testing import ContractError, check_logits_processor



def test_presence_and_frequency_penalties_count_output_tokens():
    logits = torch.zeros(2, 5)
    out = apply_presence_frequency(logits, [[1, 1, 3], []], torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]))
    # token 1: seen twice -> 0.5 + 2 * 0.25; token 3: once -> 0.5 + 0.25; row 2 saw nothing
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0], [0.0] * 5]


def test_penalties_ignore_the_prompt():
    from tandem.plugins.samplers import PresenceFrequencyPenalty
    from tandem.sampling import SamplingBatch

    params = tandem.SamplingParams(presence_penalty=1.0)
    batch = SamplingBatch([params], [[2, 2, 4]], [2])  # tokens 2, 2 are prompt; 4 is output
    out = PresenceFrequencyPenalty()(torch.zeros(1, 5), [(1.0, 0.0)], batch)
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0, -1.0]]


def test_logit_bias_adds_per_row():
    out = apply_logit_bias(torch.zeros(2, 4), [{1: 5.0, 3: -100.0}, None])
    assert out.tolist() == [[0.0, 5.0, 0.0, -100.0], [0.0] * 4]


@pytest.mark.parametrize("cls", BUILTIN_PROCESSORS, ids=lambda c: c.name)
def test_builtin_processors_pass_the_contract_suite(cls, monkeypatch):
    on = {"logit_bias": dict(logit_bias={3: 2.0, 7: -1.0}), "repetition_penalty": dict(repetition_penalty=1.3),
          "presence_frequency_penalty": dict(presence_penalty=0.5, frequency_penalty=0.3),
          "temperature": dict(temperature=0.7), "top_k": dict(top_k=5), "top_p": dict(top_p=0.8),
          "min_p": dict(min_p=0.1)}[cls.name]
    proc = cls()
    # the suite turns a processor on through SamplingParams; built-ins read their own fields instead
    monkeypatch.setattr(proc, "parse", lambda params, vocab: cls.parse(proc, tandem.SamplingParams(**on), vocab))
    check_logits_processor(proc, args={})


def test_the_contract_suite_catches_a_processor_that_touches_other_rows():
    class Leaky(LogitsProcessor):
        name = "leaky"

        def __call__(self, logits, args, batch):
            return logits - 1.0  # every row, not only the ones that asked

    with pytest.raises(ContractError, match="changed row 1, whose request did not use it"):
        check_logits_processor(Leaky())


class Exploding(LogitsProcessor):
    name = "exploding"

    def validate(self, when: str = "now"):
        if when not in ("now", "later"):
            raise InvalidRequestError("when must be 'now' or 'later'")
        return when

    def __call__(self, logits, args, batch):
        raise RuntimeError("divide by cucumber")


@pytest.fixture(scope="module")
def llm_with_exploding(tiny_hf_dir):
    from tandem.plugins import hookimpl
    import types

    manager = PluginManager(entry_points=False)
    module = types.ModuleType("exploding_plugin")
    module.tandem_logits_processors = hookimpl(lambda: [Exploding])
    manager.register(module, "exploding-plugin")
    return tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64, plugins=manager)


def test_bad_processor_requests_fail_before_any_work(llm_with_exploding):
    llm = llm_with_exploding
    with pytest.raises(InvalidRequestError, match=r"unknown logits processor\(s\) \['nope'\]; available: structured_output, logit_bias"):
        llm.generate([3, 4], tandem.SamplingParams(logits_processors={"nope": {}}))
    with pytest.raises(InvalidRequestError, match="when must be"):
        llm.generate([3, 4], tandem.SamplingParams(logits_processors={"exploding": {"when": "never"}}))
    with pytest.raises(InvalidRequestError, match="unexpected keyword"):
        llm.generate([3, 4], tandem.SamplingParams(logits_processors={"exploding": {"how": 1}}))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([3, 4], tandem.SamplingParams(logit_bias={10**6: 1.0}))
    assert llm.engine.stats()["kv_blocks_used"] == 0 and not llm.engine.has_unfinished()


def test_a_raising_processor_fails_only_its_request(llm_with_exploding):
    engine = llm_with_exploding.engine
    engine.add_request("bad", [3, 4, 5], tandem.SamplingParams(max_tokens=5, logits_processors={"exploding": {}}))
    engine.add_request("good", [6, 7, 8], tandem.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()[1]})
    assert outputs["bad"].error == ("logits processor 'exploding' from plugin 'exploding-plugin' failed: "
                                    "RuntimeError: divide by cucumber")
    assert outputs["bad"].finish_reason == "error"
    assert outputs["good"].error is None and len(outputs["good"].token_ids) == 5
    assert engine.stats()["kv_blocks_used"] == 0


def test_generate_reports_a_failing_request_in_its_output_and_serves_the_others(llm_with_exploding):
    """Regression (issue 15): LLM.generate raised for the whole call when one request's plugin
    failed, although docs/plugins.md promises RequestOutput.error for that request alone."""
    bad, good = llm_with_exploding.generate(
        [[3, 4], [5, 6]], [tandem.SamplingParams(logits_processors={"exploding": {}}),
                           tandem.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)])
    assert "exploding" in bad.error and bad.finish_reason == "error"
    assert good.error is None and len(good.token_ids) == 4
    assert llm_with_exploding.engine.stats()["kv_blocks_used"] == 0


def test_penalties_and_bias_through_generate(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64)
    greedy = llm.generate([3, 4, 5], tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    banned = greedy.token_ids[0]
    biased = llm.generate([3, 4, 5], tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                           logit_bias={banned: -100.0}))[0]
    assert banned not in biased.token_ids
    forced = llm.generate([3, 4, 5], tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                           logit_bias={9: 100.0}))[0]
    assert forced.token_ids == [9] * 6
    spread = llm.generate([3, 4, 5], tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                           logit_bias={9: 100.0}, frequency_penalty=2.0,
                                                           presence_penalty=2.0))[0]
    assert spread.token_ids == [9] * 6  # +100 outweighs any penalty in [-2, 2] x 6

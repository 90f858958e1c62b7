"""tandem.engine.spec_decode: draft tokens are held apart from a sequence's real tokens, and an
asynchronous proposer (DraftProposer.asynchronous) never makes a step wait: answers that have not
arrived mean no guesses, answers that arrive later are used only while they still fit the tokens,
and greedy output stays token-identical whatever the timing."""
from __future__ import annotations

import concurrent.futures

import pytest

from tandem import SamplingParams
from tandem.draft import DraftProposer
from tandem.engine.spec_decode import _Question
from tests.unit.engine.test_engine import check, make_llm
from tests.unit.engine.test_speculative import plugins_with

GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)
PROMPT = ([17, 42, 99, 5, 8] * 8)[:37]


class AsyncOracle(DraftProposer):
    """Knows the greedy continuation; answers asynchronously. mode: "never" (futures never
    complete), "now" (complete at once), "late" (complete when the test releases them), "wrong"
    (complete at once, every guess off by one)."""

    name = "async_oracle"
    asynchronous = True
    full: list[int] = []
    mode = "now"
    asked: list[tuple[int, int]] = []
    pending: list[tuple[concurrent.futures.Future, list[int]]] = []

    def propose(self, token_ids, num_tokens):
        raise AssertionError("an asynchronous proposer is never called synchronously while stepping")

    def propose_async(self, token_ids, num_tokens):
        AsyncOracle.asked.append((len(token_ids), num_tokens))
        guesses = self.full[len(token_ids):len(token_ids) + num_tokens]
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.mode == "now":
            future.set_result(guesses)
        elif self.mode == "wrong":
            future.set_result([(t + 1) % 300 for t in guesses])
        elif self.mode == "late":
            AsyncOracle.pending.append((future, guesses))
        return future


@pytest.fixture(scope="module")
def greedy_reference(tiny_hf_dir):
    return make_llm(tiny_hf_dir).generate([PROMPT], SamplingParams(**GREEDY))[0].token_ids


def run(tiny_hf_dir, mode, reference, release_every=0):
    AsyncOracle.full, AsyncOracle.mode, AsyncOracle.asked, AsyncOracle.pending = PROMPT + reference, mode, [], []
    llm = make_llm(tiny_hf_dir, speculative={"method": "async_oracle", "k": 4}, plugins=plugins_with(AsyncOracle))
    engine, steps, out = llm.engine, 0, None
    engine.add_request("r", PROMPT, SamplingParams(**GREEDY))
    while engine.has_unfinished():
        for seq in engine.scheduler.running:  # draft tokens never enter the real tokens
            assert len(seq.token_ids) <= len(PROMPT) + len(reference)
            assert seq.token_ids == (PROMPT + reference)[:len(seq.token_ids)]
        done = engine.step()[1]
        out = done[0] if done else out
        check(engine)
        steps += 1
        if release_every and steps % release_every == 0:
            for future, guesses in AsyncOracle.pending:
                future.set_result(guesses)
            AsyncOracle.pending = []
    return out, steps


def test_answers_that_never_arrive_cost_nothing(tiny_hf_dir, greedy_reference):
    out, steps = run(tiny_hf_dir, "never", greedy_reference)
    assert out.token_ids == greedy_reference and out.metrics.spec_proposed == 0
    assert len(AsyncOracle.asked) == 1  # one question in flight per sequence, never a second
    assert steps == len(greedy_reference)  # one token a step, as without speculation


def test_ready_answers_are_verified(tiny_hf_dir, greedy_reference):
    out, steps = run(tiny_hf_dir, "now", greedy_reference)
    assert out.token_ids == greedy_reference
    assert out.metrics.spec_accepted == out.metrics.spec_proposed > 0
    assert steps < len(greedy_reference)
    assert AsyncOracle.asked[0][1] == 5  # k + 1: one more, for the token sampled meanwhile


def test_late_answers_are_used_where_they_still_fit(tiny_hf_dir, greedy_reference):
    out, steps = run(tiny_hf_dir, "late", greedy_reference, release_every=2)
    assert out.token_ids == greedy_reference and out.metrics.spec_accepted > 0


def test_wrong_answers_never_change_the_output(tiny_hf_dir, greedy_reference):
    out, _ = run(tiny_hf_dir, "wrong", greedy_reference)
    assert out.token_ids == greedy_reference and out.metrics.spec_accepted == 0


def done(value) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future


def test_a_question_fits_only_the_tokens_it_assumed():
    # Asked at 3 real tokens, assuming guess 9 accepted; answer: what follows [.., 9].
    question = _Question(done([4, 5, 6, 7]), 3, [9])
    assert question.usable([1, 2, 3, 9], k=2) == [4, 5]  # nothing sampled since: its first guesses
    assert question.usable([1, 2, 3, 9, 4], k=4) == [5, 6, 7]  # one sampled since, as it guessed
    assert question.usable([1, 2, 3, 9, 8], k=4) == []  # sampled otherwise: stale
    assert question.usable([1, 2, 3, 1], k=4) == []  # the assumed guess was rejected
    assert question.usable([1, 2, 3, 9, 4, 5, 6, 7, 0], k=4) == []  # outran the answer

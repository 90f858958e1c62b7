"""Speculative decoding on the tiny random model: greedy output is token-identical with it on and
off (batched, chunked, preempting, aborting, with the block accounting checked every step); the
rejection-sampling rule gives the target's distribution (chi-square over 20,000 draws, and a wrong
rule fails the same test); the engine's sampled tokens keep their distribution; settings errors."""
from __future__ import annotations

import random

import pytest
import torch

from tandem import SamplingParams
from tandem.draft import DraftProposer
from tandem.errors import ConfigError, InvalidRequestError
from tandem.speculative import SpeculationState, SpeculativeConfig, verify_greedy, verify_sampled
from tests.unit.engine.test_engine import check, make_llm

NGRAM = {"method": "ngram", "k": 4}


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat phrases, so prompt lookup has something to propose."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 300) for _ in range(rng.randrange(3, 8))]
        out.append((phrase * rng.randrange(3, 9))[: rng.randrange(12, 60)])
    return out


def drive(engine, work, abort: set[str] = frozenset(), max_steps: int = 5000) -> dict:
    for request_id, prompt, params in work:
        engine.add_request(request_id, prompt, params)
    outputs, steps = {}, 0
    while engine.has_unfinished():
        for output in engine.step()[1]:
            outputs[output.request_id] = output
        steps += 1
        if steps == 3:
            for request_id in abort:
                engine.abort(request_id)
        check(engine)
        assert steps < max_steps
    return outputs


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 7, "block_size": 4},
    {"num_kv_blocks": 40, "block_size": 4},
], ids=["plain", "tight-token-budget", "preempting"])
def test_greedy_is_token_identical_with_speculation(tiny_hf_dir, options):
    prompts = repetitive_prompts(10)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    off = make_llm(tiny_hf_dir, **options).engine
    on = make_llm(tiny_hf_dir, speculative=NGRAM, **options).engine
    want = drive(off, [(f"r{i}", p, greedy) for i, p in enumerate(prompts)])
    got = drive(on, [(f"r{i}", p, greedy) for i, p in enumerate(prompts)], abort={"r3"})
    for request_id, output in got.items():
        if request_id == "r3":
            assert output.finish_reason == "abort"
            continue
        assert output.token_ids == want[request_id].token_ids, request_id
        assert output.text == want[request_id].text
    stats = on.stats()
    assert stats["spec_proposed_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0
    if "num_kv_blocks" in options:
        assert stats["preemptions"] > 0 or off.stats()["preemptions"] > 0


class OracleProposer(DraftProposer):
    """Proposes a known continuation of a known prompt (every guess right), or garbage."""

    name = "oracle"
    prompt: list[int] = []
    continuation: list[int] = []

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def propose(self, token_ids, num_tokens):
        done = len(token_ids) - len(self.prompt)
        guesses = self.continuation[done:done + num_tokens]
        return [(t + 1) % 300 for t in guesses] if self.wrong else guesses


def plugins_with(*classes):
    from tandem.plugins import PluginManager, hookimpl

    class Plugin:
        @hookimpl
        def tandem_draft_proposers(self, api_version):
            return list(classes)

    plugins = PluginManager()
    plugins.register(Plugin(), "test-proposers")
    return plugins


def test_per_request_override_and_metrics(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir, plugins=plugins_with(OracleProposer),  # no default: only requests that ask
                   speculative_methods=["oracle"])
    prompt = repetitive_prompts(1, seed=3)[0]
    greedy = dict(temperature=0, max_tokens=30, ignore_eos=True)
    plain = llm.generate([prompt], SamplingParams(**greedy))[0]
    OracleProposer.prompt, OracleProposer.continuation = prompt, plain.token_ids
    right = llm.generate([prompt], SamplingParams(**greedy, speculative={"method": "oracle", "k": 6}))[0]
    assert right.token_ids == plain.token_ids
    m = right.metrics
    assert m.spec_proposed > 0 and m.spec_accepted == m.spec_proposed and m.spec_acceptance_rate == 1
    assert m.spec_rounds <= 30 // 6 + 2 and m.spec_mean_accepted_length > 4  # ~7 tokens a forward
    with pytest.raises(InvalidRequestError, match="options come from the server"):  # a request never sets them
        SamplingParams(**greedy, speculative={"method": "oracle", "k": 6, "options": {"wrong": True}})
    wrong_by_default = make_llm(tiny_hf_dir, plugins=plugins_with(OracleProposer),
                                speculative={"method": "oracle", "k": 6, "options": {"wrong": True}})
    wrong = wrong_by_default.generate([prompt], SamplingParams(**greedy))[0]
    assert wrong.token_ids == plain.token_ids
    assert wrong.metrics.spec_proposed > 0 and wrong.metrics.spec_accepted == 0
    assert plain.metrics.spec_proposed == 0
    assert llm.engine.stats()["kv_blocks_used"] == 0
    default_on = make_llm(tiny_hf_dir, speculative={"method": "oracle"}, plugins=plugins_with(OracleProposer))
    out = default_on.generate([prompt], SamplingParams(**greedy, speculative=None))[0]
    assert out.metrics.spec_proposed == 0 and out.token_ids == plain.token_ids
    out = default_on.generate([prompt], SamplingParams(**greedy))[0]
    assert out.metrics.spec_accepted > 0 and out.token_ids == plain.token_ids


def test_stop_conditions_inside_an_accepted_run(tiny_hf_dir):
    """max_tokens and stop tokens are honoured even when several tokens arrive in one step."""
    llm_off, llm_on = make_llm(tiny_hf_dir), make_llm(tiny_hf_dir, speculative={"method": "ngram", "k": 8})
    for prompt in repetitive_prompts(6, seed=9):
        base = llm_off.generate([prompt], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))[0]
        stop_id = base.token_ids[7]
        for params in (SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[stop_id], ignore_eos=True)):
            a = llm_off.generate([prompt], params)[0]
            b = llm_on.generate([prompt], params)[0]
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert llm_on.engine.stats()["kv_blocks_used"] == 0


class BadProposer(DraftProposer):
    name = "bad"

    def propose(self, token_ids, num_tokens):
        raise RuntimeError("boom")


def test_a_failing_proposer_fails_only_its_request(tiny_hf_dir):
    engine = make_llm(tiny_hf_dir, plugins=plugins_with(BadProposer), speculative_methods=["bad"]).engine
    prompt = repetitive_prompts(1)[0]
    out = drive(engine, [("bad", prompt, SamplingParams(temperature=0, max_tokens=8, speculative={"method": "bad"})),
                         ("good", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))])
    assert out["bad"].error and "draft proposer 'bad' failed" in out["bad"].error
    assert len(out["good"].token_ids) == 8 and engine.stats()["kv_blocks_used"] == 0


def test_bad_settings(tiny_hf_dir):
    for bad in ({"method": "ngram", "k": 0}, {"method": "ngram", "k": 17}, {"methd": "ngram"}, "ngram",
                {"method": ""}, {"method": "ngram", "adaptive": "yes"}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(speculative=bad)
    with pytest.raises(ConfigError, match="unknown draft_proposer|available"):
        make_llm(tiny_hf_dir, speculative={"method": "nope"})
    llm = make_llm(tiny_hf_dir)
    with pytest.raises(InvalidRequestError, match="'nope' is not enabled"):
        llm.generate("hi", SamplingParams(speculative={"method": "nope"}))
    with pytest.raises(InvalidRequestError, match="'draft_model' is not enabled"):  # installed, not enabled
        llm.generate("hi", SamplingParams(speculative={"method": "draft_model"}))
    assert SpeculativeConfig.parse({"method": "none"}) is None and SpeculativeConfig.parse(None) is None


# -- the verification rules ---------------------------------------------------------------------
def test_verify_greedy():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == (3, 8)  # all accepted, bonus token
    assert verify_greedy([5, 9, 7, 8], [5, 6, 7]) == (1, 9)
    assert verify_greedy([1], []) == (0, 1)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against expected probabilities (bins with tiny mass pooled)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def first_tokens(rule, p, q, draws: int, point_mass: int | None = None) -> torch.Tensor:
    """The first emitted token of `draws` verifications of one guess. The guess is drawn from q
    (what the rule assumes of a model proposer), or is always `point_mass` (an n-gram proposer)."""
    g, guesses = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    counts = torch.zeros(p.shape[1])
    for _ in range(draws):
        draft = point_mass if point_mass is not None else int(torch.multinomial(q[0], 1, generator=guesses))
        accepted, token = rule(p, [draft], None if point_mass is not None else q, g)
        counts[draft if accepted else token] += 1
    return counts


@pytest.fixture(scope="module")
def target_and_draft(tiny_llm):
    """A real target distribution (the tiny model's next-token softmax at temperature 1) over its
    vocabulary, and a different draft distribution."""
    out = tiny_llm.engine.runner.model
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    from tandem.model.kv_cache import KVCache

    cache = KVCache(tiny_llm.config, 8, torch.float32)
    with torch.inference_mode():
        logits = out.compute_logits(out(ids, torch.arange(5).unsqueeze(0), cache)[0, -2:])
    p = (logits / 0.7).softmax(-1)  # sharpen a little so a wrong rule shows
    q = (logits[[0]] * 0.3).softmax(-1)
    return p, q


def test_rejection_sampling_gives_the_target_distribution(target_and_draft):
    p, q = target_and_draft
    for point_mass in (int(p[0].argmax()), int(q[0].argmax()), None):  # n-gram guesses, a model's draws
        counts = first_tokens(verify_sampled, p, q, 20_000, point_mass)
        assert chi_square_p(counts, p[0]) > 1e-3


def test_a_wrong_rule_fails_the_same_test(target_and_draft):
    p, q = target_and_draft

    def residual_is_p(p_, drafts, q_, g):  # a classic bug: on rejection, draw from p, not max(0, p - q)
        d = drafts[0]
        if float(torch.rand((), generator=g)) * float(q_[0, d]) < float(p_[0, d]):
            return 1, 0
        return 0, int(torch.multinomial(p_[0], 1, generator=g))

    counts = first_tokens(residual_is_p, p, q, 20_000)
    assert chi_square_p(counts, p[0]) < 1e-6


def test_engine_sampling_keeps_the_distribution(tiny_hf_dir):
    """Temperature 1: the distribution of the tokens generated while speculating (the second
    token and after) matches the distribution without speculation."""
    prompt = [10, 11, 12, 13] * 6
    draws = {}
    for name, spec in (("off", None), ("on", {"method": "ngram", "k": 3, "adaptive": False})):
        llm = make_llm(tiny_hf_dir, speculative=spec)
        counts = torch.zeros(llm.config.vocab_size)
        # ignore_eos with max_tokens 3: tokens 2 and 3 come from verification rounds
        outs = llm.generate([prompt] * 60, SamplingParams(temperature=1.0, n=50, max_tokens=3, ignore_eos=True,
                                                           seed=None))
        for o in outs:
            for sample in o.outputs:
                counts[sample.token_ids[1]] += 1
        draws[name] = counts
        if spec:
            assert llm.engine.stats()["spec_proposed_tokens"] > 0
    # two-sample chi-square: both against the pooled distribution
    pooled = (draws["off"] + draws["on"]) / (draws["off"].sum() + draws["on"].sum())
    assert chi_square_p(draws["on"], pooled) > 1e-3


def test_adaptive_k_and_pause():
    state = SpeculationState(SpeculativeConfig("ngram", k=8))
    assert state.wants() == 8
    state.record(8, 1)
    assert state.k == 4
    for _ in range(SpeculationState.PAUSE_AFTER):
        state.record(state.k, 0)
    assert state.wants() == 0  # paused
    for _ in range(SpeculationState.PAUSE_STEPS):
        state.wants()
    assert state.wants() == 8
    state.record(8, 8)
    assert state.k == 8 and (state.accepted, state.proposed) == (9, 8 + 4 + 2 + 1 + 1 + 8)


def test_a_draft_model_drafting_for_itself_is_always_right(tiny_hf_dir):
    """The target as its own draft (fp32, no quantization): every guess is accepted, the output
    is unchanged, and a layer-truncated draft keeps the output unchanged too."""
    prompts = repetitive_prompts(4, seed=5)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in make_llm(tiny_hf_dir).generate(prompts, greedy)]
    same = {"method": "draft_model", "k": 4, "options": {"model": str(tiny_hf_dir), "quantization": None}}
    llm = make_llm(tiny_hf_dir, speculative=same)
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == want
    assert all(o.metrics.spec_proposed > 0 and o.metrics.spec_accepted == o.metrics.spec_proposed for o in outs)
    truncated = {"method": "draft_model", "k": 3, "options": {"model": str(tiny_hf_dir), "quantization": None,
                                                              "num_layers": 1}}
    outs = make_llm(tiny_hf_dir, speculative=truncated).generate(prompts, greedy)
    assert [o.token_ids for o in outs] == want
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_the_draft_cache_rolls_back(tiny_hf_dir):
    from tandem.plugins.draft import DraftModelProposer as Proposer

    kept = Proposer(model=str(tiny_hf_dir), quantization=None, max_sequences=2)
    tokens = repetitive_prompts(1, seed=8)[0]
    first = kept.propose(tokens, 4)
    diverged = tokens + [(first[0] + 1) % 300]  # the target rejected the first guess
    fresh = Proposer(model=str(tiny_hf_dir), quantization=None)
    assert kept.propose(diverged, 4) == fresh.propose(diverged, 4)
    accepted = tokens + first[:2] + [7]
    assert kept.propose(accepted, 3) == fresh.propose(accepted, 3)
    assert len(kept.caches) == 1  # the same sequence kept one cache
    other = [(t * 7) % 300 for t in tokens]
    kept.propose(other, 2)
    kept.propose(list(reversed(other)), 2)
    assert len(kept.caches) == 2  # at most max_sequences


def test_a_failing_processor_ends_a_speculating_request_with_n_samples(tiny_hf_dir):
    """A logits processor that raises while n samples verify guesses fails the request once, frees
    its blocks, and leaves the engine running."""
    from tandem.plugins import PluginManager, hookimpl
    from tandem.sampling import LogitsProcessor

    class Boom(LogitsProcessor):
        name = "boom"
        calls = 0

        def __call__(self, logits, args, batch):
            Boom.calls += 1
            if Boom.calls > 2:  # after the first token: while verifying guesses
                raise RuntimeError("boom")
            return logits

    class Plugin:
        @hookimpl
        def tandem_logits_processors(self, api_version):
            return [Boom]

        @hookimpl
        def tandem_draft_proposers(self, api_version):
            return [OracleProposer]

    plugins = PluginManager()
    plugins.register(Plugin(), "boom-and-oracle")
    engine = make_llm(tiny_hf_dir, plugins=plugins, speculative_methods=["oracle"]).engine
    prompt = repetitive_prompts(1, seed=4)[0]
    OracleProposer.prompt, OracleProposer.continuation = prompt, [5] * 40
    params = SamplingParams(temperature=1.0, n=3, max_tokens=20, ignore_eos=True, logits_processors={"boom": {}},
                            speculative={"method": "oracle", "k": 4})
    out = drive(engine, [("r", prompt, params), ("ok", prompt, SamplingParams(temperature=0, max_tokens=6))])
    assert out["r"].error and "boom" in out["r"].error
    assert len(out["ok"].token_ids) == 6 and engine.stats()["kv_blocks_used"] == 0

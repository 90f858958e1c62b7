"""H2O eviction (plugins/attention.py `H2O`) on the tiny random Llama, against a plain-torch
reference: a contiguous cache, one token per forward, every key's accumulated attention kept per
token, the same block-granular eviction. The engine's teacher-forced logprobs and greedy tokens
match it (and do not match the same reference evicting the oldest blocks: the test sees which
blocks go); a sequence's evictions and outputs are the same alone and in a batch; a sequence that
evicted publishes nothing to the prefix cache, and one that hits a prefix resumes its scores;
every block is back in the pool at the end."""
from __future__ import annotations

import random

import pytest
import torch

import tandem
from tandem import SamplingParams
from tandem.engine.sequence import Sequence
from tandem.errors import ConfigError, InvalidRequestError
from tandem.model.attention import AttentionVariant
from tandem.plugins.attention import H2O, H2OEviction
from tests.unit.engine.test_engine import drive, live_seqs

BLOCK, BUDGET, RECENT = 4, 16, 8  # 4 blocks of KV at most: 2 recent, 1-2 heavy hitters, 1 being written


def make_llm(path, **options) -> tandem.LLM:
    defaults = dict(attention="h2o", attention_options={"budget": BUDGET, "recent": RECENT}, num_kv_blocks=64,
                    block_size=BLOCK, max_num_batched_tokens=8)
    return tandem.LLM(str(path), progress=False, **{**defaults, **options})


class H2OReference:
    """The model's AttentionContext for one sequence, one token per forward: full causal attention
    (explicit fp32 softmax) over the kept positions; each key's score is the probability it got,
    summed over query heads, layers and queries. After every token, at a block boundary from
    `budget` on, the lowest-scoring whole blocks outside the last `recent` positions are dropped
    until budget / block - 1 full blocks are left (ties: the older). oldest=True drops the oldest
    instead (a sliding window): the contrast that shows a test can tell them apart."""

    variant = AttentionVariant()  # RoPE on; the model reads only this

    def __init__(self, config, max_len: int, oldest: bool = False):
        shape = (config.num_layers, max_len, config.num_kv_heads, config.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.kept = torch.ones(max_len, dtype=torch.bool)
        self.scores = torch.zeros(max_len, dtype=torch.float64)
        self.length, self.oldest = 0, oldest
        self.history: dict[int, list[int]] = {}  # tokens computed -> kept blocks

    def attend(self, layer, q, k, v):  # q (1, H, D), k/v (1, Hkv, D)
        end = self.length + 1
        self.k[layer, self.length], self.v[layer, self.length] = k[0], v[0]
        visible = self.kept[:end].nonzero().flatten()
        group = q.shape[1] // k.shape[1]
        keys = self.k[layer, visible].repeat_interleave(group, dim=1)  # (S, H, D)
        values = self.v[layer, visible].repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,shd->hs", q[0].float(), keys) / q.shape[-1] ** 0.5).softmax(-1)  # (H, S)
        self.scores[visible] += probs.sum(0).double()
        return torch.einsum("hs,shd->hd", probs, values).unsqueeze(0)

    def advance(self) -> None:
        self.length += 1
        n = self.length
        if n >= BUDGET and n % BLOCK == 0:
            live = [b for b in range(n // BLOCK) if self.kept[b * BLOCK]]
            block_scores = self.scores[:n].view(-1, BLOCK).sum(1)
            eligible = [b for b in live if (b + 1) * BLOCK <= n - RECENT]
            order = eligible if self.oldest else sorted(eligible, key=lambda b: (float(block_scores[b]), b))
            for b in order[:len(live) - (BUDGET // BLOCK - 1)]:
                self.kept[b * BLOCK:(b + 1) * BLOCK] = False
        self.history[n] = [b for b in range(-(-n // BLOCK)) if self.kept[b * BLOCK]]

    def logits(self, model, token: int) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(torch.tensor([[token]]), torch.tensor([[self.length]]), self)
        self.advance()
        return model.compute_logits(hidden[0, -1]).float()


def reference_logprobs(llm, ids: list[int], oldest: bool = False) -> torch.Tensor:
    ref = H2OReference(llm.config, len(ids), oldest)
    logits = torch.stack([ref.logits(llm.model, t) for t in ids[:-1]])
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def reference_greedy(llm, prompt: list[int], steps: int) -> tuple[list[int], dict[int, list[int]]]:
    ref = H2OReference(llm.config, len(prompt) + steps)
    for t in prompt[:-1]:
        ref.logits(llm.model, t)
    out, token = [], prompt[-1]
    for _ in range(steps):
        token = int(ref.logits(llm.model, token).argmax())
        out.append(token)
    return out, ref.history


def run(engine, requests, arrive_every: int = 0) -> tuple[dict, dict]:
    """Step to the end (test_engine's drive: the block accounting checked after every step), checking
    the KV budget after every step; returns the outputs and, per request, its live blocks at each
    computed length."""
    kept = {}

    def record(engine) -> None:
        for seq in live_seqs(engine):
            live = engine.block_manager.live_blocks(seq)
            assert len(live) <= BUDGET // BLOCK
            kept.setdefault(seq.request_id, {})[seq.num_computed_tokens] = live

    return drive(engine, requests, arrive_every, on_step=record), kept


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    return make_llm(tiny_hf_dir)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(19)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (30, 11, 45)]


def test_select_evicts_the_lowest_scoring_blocks_outside_the_recent_window():
    ev = H2OEviction(block_size=4, budget=16, recent=8)
    scores = [5.0, 1.0, 3.0, 1.0, 0.0, 0.0]  # blocks 4 and 5 are the recent window at 24 tokens
    assert ev.select(scores, [0, 1, 2, 3, 4, 5], 24) == [1, 2, 3]  # 6 live -> 3 left, the heaviest kept
    assert ev.select(scores, [0, 2, 3, 4, 5], 24) == [2, 3]
    assert ev.select([1.0, 1.0, 0.5, 0.0], [0, 1, 2, 3], 16) == [0]  # a tie goes to the older; 2 is recent
    assert ev.select(scores, [0, 1, 2, 3, 4], 18) == []  # not a boundary: no step ends past one
    assert ev.select(scores, [0, 1, 2], 12) == []  # below the budget
    assert [ev.step_end(n) for n in (0, 5, 16, 17, 19, 20)] == [16, 16, 20, 20, 20, 24]


@pytest.mark.parametrize("options, message", [
    ({"budget": 16, "recent": 16}, "recent \\(16\\) must be below budget"),
    ({"budget": 18, "recent": 8}, "budget \\(18\\) must be a multiple of the KV block size \\(4\\)"),
    ({"budget": 16, "recent": 6}, "recent \\(6\\) must be a multiple"),
    ({"budget": 16, "recent": 0}, "recent must be an integer >= 1"),
    ({"window": 16}, "unexpected keyword|window"),
])
def test_bad_options_are_config_errors(tiny_hf_dir, options, message):
    with pytest.raises(ConfigError, match=message):
        make_llm(tiny_hf_dir, attention_options=options)


def test_what_cannot_evict_by_attention_refuses(tiny_hf_dir, llm):
    with pytest.raises(ConfigError, match="speculative"):
        make_llm(tiny_hf_dir, speculative={"method": "ngram", "k": 3})
    with pytest.raises(InvalidRequestError, match="no speculative decoding"):
        llm.engine.add_request("s", [3, 4, 5], SamplingParams(speculative={"method": "ngram", "k": 3}))
    with pytest.raises(ConfigError, match="score through the engine"):
        llm.score([3, 4, 5, 6])  # the contiguous cache keeps every key: it would not be H2O
    with pytest.raises(ConfigError, match="needs 5 KV blocks"):
        make_llm(tiny_hf_dir, num_kv_blocks=4)
    assert H2O(budget=64, recent=32).key_window() is None  # never the CPU kernels' key ranges


def test_engine_score_matches_the_reference(llm, prompts):
    ids = prompts[2] + prompts[0]  # 75 tokens: 15 evictions
    got = torch.tensor(llm.engine.score(ids).logprobs)
    torch.testing.assert_close(got, reference_logprobs(llm, ids).float(), atol=2e-4, rtol=1e-4)
    # the same budget evicting the oldest blocks instead scores visibly differently: wrong blocks fail
    assert (got - reference_logprobs(llm, ids, oldest=True).float()).abs().max() > 1e-2
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_generation_matches_the_reference_alone_and_in_a_batch(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    alone = [run(llm.engine, [r]) for r in requests]
    for arrive_every in (0, 3):  # together from the start, and staggered (prefill chunks beside decodes)
        together, kept = run(llm.engine, requests, arrive_every)
        for (request_id, prompt, _), (out_alone, kept_alone) in zip(requests, alone):
            a, b = out_alone[request_id].outputs[0], together[request_id].outputs[0]
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.logprobs]),
                                       torch.tensor([lp.logprob for lp in b.logprobs]), atol=1e-5, rtol=1e-5)
            common = kept[request_id].keys() & kept_alone[request_id].keys()  # chunking differs before the budget
            assert {n for n in kept_alone[request_id] if n >= BUDGET} <= common
            assert all(kept[request_id][n] == kept_alone[request_id][n] for n in common)
    for request_id, prompt, _ in requests:
        tokens, history = reference_greedy(llm, prompt, 40)
        assert alone[int(request_id[1:])][0][request_id].token_ids == tokens
        for n, live in alone[int(request_id[1:])][1][request_id].items():
            assert live == history[n], f"{request_id} at {n} tokens"


def test_prefix_cache_shares_only_before_eviction(tiny_hf_dir, llm, prompts):
    engine = llm.engine
    prefix = prompts[2][:36]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    run(engine, [("a", prefix + [7, 8], params)])
    # a published the blocks it computed before its first eviction (at 16 tokens), none after
    cached = set(engine.block_manager.cached.values())
    assert len(cached) >= BUDGET // BLOCK and all(engine.block_manager.hashes[b] is not None for b in cached)
    chain = engine.block_manager.chain(Sequence("x", prefix + [7, 8], 38, params))
    assert engine.block_manager.num_cached_prefix(chain) == BUDGET // BLOCK
    hits_before = engine.stats()["prefix_cache_hit_tokens"]
    b_prompt = prefix + [9, 10, 11]
    out_cached, kept_cached = run(engine, [("b", b_prompt, params), ("c", b_prompt, params)])
    # b and c share the prefix up to the first eviction (3 blocks: a hit stops before it), then diverge
    assert engine.stats()["prefix_cache_hit_tokens"] - hits_before == 2 * (BUDGET - BLOCK)
    fresh = make_llm(tiny_hf_dir, enable_prefix_caching=False)
    out_fresh, kept_fresh = run(fresh.engine, [("b", b_prompt, params)])
    assert out_cached["b"].token_ids == out_cached["c"].token_ids == out_fresh["b"].token_ids
    after = {n: live for n, live in kept_cached["b"].items() if n >= BUDGET}
    assert after == {n: kept_fresh["b"][n] for n in after}  # the hit brought its queries' attention



def test_preemption_recomputes_the_same_evictions(tiny_hf_dir, llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    requests = [(f"p{i}", p, params) for i, p in enumerate(prompts)]
    roomy, _ = run(llm.engine, requests)
    tight = make_llm(tiny_hf_dir, num_kv_blocks=9)  # room for two sequences' budgets, not three
    out, _ = run(tight.engine, requests)
    assert tight.engine.stats()["preemptions"] > 0
    assert {r: o.token_ids for r, o in out.items()} == {r: o.token_ids for r, o in roomy.items()}

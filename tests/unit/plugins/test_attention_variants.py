"""Attention variants: each mask and bias against a definition written out element by element,
the SDPA backend against the naive reference, and on a tiny model the paged engine (chunked
prefill, batched decode, released blocks) against a contiguous cache computing the same variant
with the naive backend."""
from __future__ import annotations

import math

import pytest
import torch

import tandem
from tandem.model.kv_cache import KVCache
from tandem.plugins import AttentionBackend, PluginManager
from tandem.plugins.attention import ALiBi, AttentionSinks, LocalGlobal, NaiveBackend, SlidingWindow, alibi_slopes
from tandem.plugins.testing import ContractError, check_attention_variant
from tandem.plugins import AttentionVariant

N = 24


def expected_mask(rule) -> torch.Tensor:
    """The mask from a per-(query, key) rule, by explicit loops."""
    return torch.tensor([[rule(q, k) for k in range(N)] for q in range(N)])


def actual_mask(variant) -> torch.Tensor:
    pos = torch.arange(N)
    return variant.allowed(pos.view(-1, 1), pos.view(1, -1))


@pytest.mark.parametrize("variant, rule", [
    (AttentionVariant(), lambda q, k: k <= q),
    (SlidingWindow(window=5), lambda q, k: q - 5 < k <= q),
    (AttentionSinks(num_sink=2, window=4), lambda q, k: k <= q and (k < 2 or k > q - 4)),
    (LocalGlobal(window=3, num_global=2), lambda q, k: k <= q and (k < 2 or k > q - 3)),
    (LocalGlobal(window=3, num_global=1, stride=4), lambda q, k: k <= q and (k < 1 or k > q - 3 or k % 4 == 3)),
    (ALiBi(), lambda q, k: k <= q),
], ids=["causal", "sliding_window", "sinks", "local_global", "local_global_strided", "alibi"])
def test_mask_is_exactly_the_rule(variant, rule):
    assert torch.equal(actual_mask(variant), expected_mask(rule))


def test_alibi_slopes_match_the_paper():
    assert alibi_slopes(8).tolist() == [2 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence
    sixteen = [2 ** -(0.5 * (i + 1)) for i in range(16)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor([2 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]))


def test_alibi_bias_is_slope_times_distance():
    pos = torch.arange(N)
    bias = ALiBi().bias(pos.view(-1, 1), pos.view(1, -1), 4)
    slopes = alibi_slopes(4)
    for h in range(4):
        for q in (0, 7, 23):
            for k in (0, 5, 23):
                assert bias[h, q, k].item() == pytest.approx(slopes[h].item() * (k - q))


@pytest.mark.parametrize("variant", [AttentionVariant(), SlidingWindow(window=7), AttentionSinks(num_sink=3, window=6),
                                     ALiBi(), LocalGlobal(window=5, num_global=2),
                                     LocalGlobal(window=5, num_global=2, stride=8)],
                         ids=lambda v: v.describe())
def test_builtin_variants_pass_the_contract_suite(variant):
    check_attention_variant(variant)  # SDPA vs naive: prefill, chunk over cache, batched decode


def test_the_contract_suite_catches_a_bad_variant():
    class Peeking(AttentionVariant):
        name = "peeking"

        def allowed(self, q_pos, k_pos):
            return k_pos <= q_pos + 1

    class Forgetful(SlidingWindow):
        name = "forgetful"

        def retention(self):
            return type(super().retention())(0, self.window - 2)

    with pytest.raises(ContractError, match="must be causal"):
        check_attention_variant(Peeking())
    with pytest.raises(ContractError, match="retention\\(\\) frees keys"):
        check_attention_variant(Forgetful(window=6))


# -- on a model -----------------------------------------------------------------------------------

PLUGINS = PluginManager(entry_points=False)


def reference_logits(llm: tandem.LLM, tokens: list[int], variant) -> torch.Tensor:
    """Last-position logits from a contiguous cache (keeps every key) with the naive backend."""
    cache = KVCache(llm.config, len(tokens), variant=variant, backend=NaiveBackend())
    with torch.inference_mode():
        hidden = llm.model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0), cache)
    return llm.model.compute_logits(hidden[0, -1])


def greedy_reference(llm: tandem.LLM, prompt: list[int], variant, steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(reference_logits(llm, tokens, variant).argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name, options", [("sliding_window", {"window": 12}), ("sinks", {"num_sink": 4, "window": 10}),
                                           ("alibi", {}), ("local_global", {"window": 8, "num_global": 3}),
                                           ("local_global", {"window": 8, "num_global": 3, "stride": 5})])
def test_engine_generation_matches_the_naive_reference(tiny_hf_dir, name, options):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, attention=name, attention_options=options,
                     num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)  # chunked prefill, small blocks
    prompts = [list(range(3, 33)), list(range(40, 51))]
    params = tandem.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, params)  # two sequences: batched decode with padding and holes
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_reference(llm, prompt, llm.variant, 20)


def test_sliding_window_runs_past_the_window_without_growing_the_kv(tiny_hf_dir):
    window, block = 16, 4
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, attention="sliding_window",
                     attention_options={"window": window}, num_kv_blocks=12, block_size=block,
                     max_num_batched_tokens=8)
    engine = llm.engine
    prompt = list(range(3, 23))
    engine.add_request("r", prompt, tandem.SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
    peak, tokens = 0, []
    while engine.has_unfinished():
        deltas, _ = engine.step()
        tokens += [t for d in deltas for t in d.token_ids]
        peak = max(peak, engine.stats()["kv_blocks_used"])
    # 140 tokens through a 12-block (48-token) pool: only the window and the block being written stay
    assert len(prompt) + len(tokens) == 140 > 12 * block
    assert peak <= -(-(window + 8) // block) + 1
    assert engine.stats()["kv_blocks_used"] == 0
    assert tokens[:40] == greedy_reference(llm, prompt, llm.variant, 40)


def test_alibi_replaces_rope_and_a_backend_failure_names_the_plugin(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, attention="alibi", num_kv_blocks=32)
    assert not llm.variant.rotary

    class Broken(AttentionBackend):
        name = "broken"

        def decode(self, q, keys, values, mask):
            raise RuntimeError("no kernel for this shape")

    llm.engine.runner.backend = Broken()
    with pytest.raises(tandem.PluginError, match="attention backend 'broken' with variant 'alibi' failed"):
        llm.generate([3, 4, 5], tandem.SamplingParams(max_tokens=4))
    assert llm.engine.stats()["kv_blocks_used"] == 0  # nothing leaked
    assert math.isfinite(llm.score([3, 4, 5, 6]).perplexity)  # and the LLM still works

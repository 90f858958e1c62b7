"""The "triton" attention backend: on the tiny model, the engine gives the same greedy tokens as
with "sdpa" (a batch of prompts of different lengths, chunked prefill, blocks crossed, a sliding
window whose old blocks are freed) with the Triton kernels actually running (in the interpreter);
it passes the backend contract for the variants the kernels express and for one they do not; and
it falls back to the torch path exactly where it must. Also what it relies on: AttentionMask.build
describes consecutive keys, and only those."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

import tandem
from tandem import SamplingParams
from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant
from tandem.plugins import get_plugin_manager
from tandem.plugins.attention import ALiBi, AttentionSinks, LocalGlobal, SlidingWindow
from tandem.plugins.testing import check_attention_backend
from tandem.plugins.triton_attention import TritonBackend

pytestmark = pytest.mark.skipif(bool(os.environ.get("TANDEM_TEST_GPU")),
                                reason="the engine runs on the CPU, where the kernels run only interpreted")

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind",
           "Now is the winter", "O Romeo, Romeo, wherefore art thou"]
# Small blocks and prefill chunks: prompts span several blocks and arrive in chunks over a cache.
ENGINE = dict(block_size=4, num_kv_blocks=96, max_num_batched_tokens=16, progress=False)


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """Counts calls of the Triton wrappers (the backend looks them up on each call)."""
    from tandem.kernels import flash_attention, paged_attention_decode

    calls = Counter()
    for module, name in ((flash_attention, "flash_attention_triton"),
                         (paged_attention_decode, "paged_attention_decode_triton")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def greedy_tokens(path, backend: str, prompts, **options) -> list[list[int]]:
    llm = tandem.LLM(str(path), attention_backend=backend, **ENGINE, **options)
    return [out.token_ids for out in llm.generate(prompts, GREEDY)]


def test_registered_as_a_builtin():
    assert get_plugin_manager().get("attention_backend", "triton") is TritonBackend


@pytest.mark.parametrize("options", [{}, {"attention": "sliding_window", "attention_options": {"window": 6}}],
                         ids=["causal", "sliding_window"])
def test_engine_gives_the_same_greedy_tokens_as_sdpa(tiny_hf_dir, kernel_calls, options, monkeypatch):
    expected = greedy_tokens(tiny_hf_dir, "sdpa", PROMPTS, **options)
    assert not kernel_calls
    torch_path = Counter()  # from here on, every call of the base class's methods is a fallback
    for name in ("prefill", "decode", "paged_decode"):
        def counted(self, *args, _real=getattr(AttentionBackend, name), _name=name):
            torch_path[_name] += 1
            return _real(self, *args)
        monkeypatch.setattr(AttentionBackend, name, counted)
    assert greedy_tokens(tiny_hf_dir, "triton", PROMPTS, **options) == expected
    assert kernel_calls["flash_attention_triton"] > 0 and kernel_calls["paged_attention_decode_triton"] > 0
    assert not torch_path  # fresh prompts, chunks over a cache (with freed blocks), decode batches


def test_one_sequence_decodes_through_the_kernel(tiny_hf_dir, kernel_calls, monkeypatch):
    """One sequence on consecutive blocks: the engine calls `decode` on a view of the pool."""
    decodes = []
    real_decode = TritonBackend.decode
    monkeypatch.setattr(TritonBackend, "decode", lambda self, *args: decodes.append(1) or real_decode(self, *args))
    expected = greedy_tokens(tiny_hf_dir, "sdpa", PROMPTS[1:2])
    assert greedy_tokens(tiny_hf_dir, "triton", PROMPTS[1:2]) == expected
    decode_steps = 2 * (GREEDY.max_tokens - 1)  # the first token comes from the prefill; 2 layers
    assert len(decodes) == kernel_calls["paged_attention_decode_triton"] == decode_steps


@pytest.mark.parametrize("variant", [AttentionVariant(), SlidingWindow(window=7), ALiBi()],
                         ids=["causal", "sliding_window", "alibi"])
def test_contract_with_the_kernels(variant, kernel_calls):
    check_attention_backend(TritonBackend, variant)
    # chunked and whole prefill, plus each decode row checked against a prefill alone
    assert kernel_calls["flash_attention_triton"] >= 5 and kernel_calls["paged_attention_decode_triton"] == 1


@pytest.mark.parametrize("variant", [AttentionSinks(num_sink=2, window=5), LocalGlobal(window=4, num_global=2),
                                     type("Wider", (SlidingWindow,), {"allowed": lambda self, q, k: k <= q})(window=3)],
                         ids=["sinks", "local_global", "subclass_with_its_own_rule"])
def test_contract_through_the_torch_path(variant, kernel_calls):
    """Variants the kernels cannot express run on the torch path, correctly."""
    check_attention_backend(TritonBackend, variant)
    assert not kernel_calls


def test_torch_path_without_cuda_or_interpreter(monkeypatch, kernel_calls):
    monkeypatch.setattr("tandem.kernels._utils.is_interpreting", lambda: False)
    check_attention_backend(TritonBackend, SlidingWindow(window=7))
    assert not kernel_calls


def test_a_mask_from_elsewhere_takes_the_torch_path(kernel_calls):
    torch.manual_seed(0)
    q, keys, values = torch.randn(1, 4, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    plain = AttentionMask(torch.ones(1, 1, 9, dtype=torch.bool))  # not built from positions
    assert torch.equal(TritonBackend().decode(q, keys, values, plain),
                       AttentionBackend().decode(q, keys, values, plain))
    assert not kernel_calls


def test_an_int8_pool_is_gathered_not_read_in_place(kernel_calls):
    """The kernel reads only DenseKVPool data in place; an int8 pool dequantizes on gather, then
    the decode kernel runs over the gathered keys."""
    torch.manual_seed(0)
    q, keys, values = torch.randn(1, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    fmt = get_plugin_manager().create("kv_cache_format", "int8")
    k_pool, v_pool = (fmt.create_pool(4, 4, 2, 16, torch.float32) for _ in range(2))
    k_pool.write(torch.tensor([8, 9, 10, 11, 0, 1, 2, 3]), keys)  # blocks 2, 0
    v_pool.write(torch.tensor([8, 9, 10, 11, 0, 1, 2, 3]), values)
    tables = torch.tensor([[2, 0]])
    mask = AttentionMask.build(AttentionVariant(), torch.tensor([[7]]), torch.arange(8).unsqueeze(0), 4)
    out = TritonBackend().paged_decode(q, k_pool, v_pool, tables, mask)
    assert kernel_calls == Counter(paged_attention_decode_triton=1)
    torch.testing.assert_close(out, AttentionBackend().paged_decode(q, k_pool, v_pool, tables, mask),
                               atol=1e-5, rtol=1e-5)


# -- what the backend relies on: AttentionMask.build's description of the keys --------------------

def test_build_describes_consecutive_keys():
    variant = SlidingWindow(window=4)
    chunk = AttentionMask.build(variant, torch.arange(10, 15), torch.arange(3, 15), 2)  # keys 3..14, queries 10..14
    assert chunk.keys.variant is variant and chunk.keys.num_keys.tolist() == 12
    lengths = torch.tensor([5, 1, 8])
    key_pos = torch.arange(8).expand(3, -1) + torch.tensor([[0], [0], [4]])  # row 2: blocks 0 freed, keys 4..11
    valid = torch.arange(8) < lengths.unsqueeze(1)
    decode = AttentionMask.build(variant, torch.tensor([[4], [0], [11]]), key_pos, 2, valid)
    assert decode.keys.num_keys.tolist() == [5, 1, 8]


@pytest.mark.parametrize("q_pos, k_pos, valid", [
    (torch.arange(5, 9), torch.cat([torch.arange(0, 2), torch.arange(4, 9)]), None),  # a hole (sinks)
    (torch.arange(5, 9), torch.arange(0, 10), None),  # keys past the last query
    (torch.tensor([5, 7]), torch.arange(0, 8), None),  # queries not consecutive
    (torch.tensor([[3]]), torch.arange(6).unsqueeze(0), torch.tensor([[True, False, True, True, False, False]])),
], ids=["hole", "keys_past_the_query", "gapped_queries", "valid_not_a_prefix"])
def test_build_leaves_other_layouts_undescribed(q_pos, k_pos, valid):
    assert AttentionMask.build(AttentionVariant(), q_pos, k_pos, 2, valid).keys is None

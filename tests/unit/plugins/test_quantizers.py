"""Quantizers: each built-in against an independent dequantize-then-matmul reference and the
contract suite; the model pass (all linears swapped, errors before any change); the int8 KV cache
round trip and its generation on a tiny model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tandem
from tandem.errors import ConfigError
from tandem.model.quantization import quantize_model
from tandem.plugins.kv_cache import Int8KVCache
from tandem.plugins.quantizers import FP8, NF4, NF4_LEVELS, Int4WeightOnly, Int8WeightOnly
from tandem.plugins.testing import ContractError, check_kv_cache_format, check_quantizer
from tandem.plugins import Quantizer

GEN = torch.Generator().manual_seed(0)
W = torch.randn(64, 128, generator=GEN) * 0.05
X = torch.randn(5, 128, generator=GEN)


@pytest.mark.parametrize("quantizer, tolerance", [(Int8WeightOnly(), 0.01), (Int4WeightOnly(), 0.1),
                                                  (Int4WeightOnly(group_size=64), 0.12), (NF4(), 0.1), (FP8(), 0.05)],
                         ids=["int8", "int4-g32", "int4-g64", "nf4", "fp8"])
def test_builtin_quantizers_pass_the_contract_suite(quantizer, tolerance):
    check_quantizer(quantizer, max_relative_error=tolerance)


def test_int8_is_per_channel_symmetric_and_matches_its_dequantized_weight():
    module = Int8WeightOnly().quantize(W)
    scales = (W.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    expected_q = (W / scales.unsqueeze(1)).round().clamp(-127, 127)
    assert torch.equal(module.qweight.float(), expected_q)
    reference = (X.bfloat16().float() @ (expected_q * scales.unsqueeze(1)).T)
    torch.testing.assert_close(module(X), reference, rtol=2e-2, atol=2e-3)


def test_int4_kernel_matches_the_asymmetric_group_reference():
    module = Int4WeightOnly(group_size=32).quantize(W)
    groups = W.view(64, 4, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((groups - zero) / scale + 8).round().clamp(0, 15)
    dequantized = ((q - 8) * scale + zero).view(64, 128)
    torch.testing.assert_close(module(X), X.bfloat16().float() @ dequantized.T, rtol=2e-2, atol=2e-3)


def test_nf4_uses_the_normal_float_levels_and_blockwise_absmax():
    module = NF4(block_size=64).quantize(W)
    restored = module.dequantize()
    blocks = W.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = NF4_LEVELS[((blocks / absmax).unsqueeze(-1) - NF4_LEVELS).abs().argmin(-1)] * absmax
    torch.testing.assert_close(restored, nearest.view_as(W))
    assert NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1


def test_fp8_stores_e4m3_with_per_channel_scales():
    module = FP8().quantize(W)
    assert module.weight.dtype == torch.float8_e4m3fn
    assert module.weight.float().abs().amax(dim=1).max() <= 448
    torch.testing.assert_close(module.dequantize(), W, rtol=0.07, atol=1e-4)


def test_the_contract_suite_catches_a_bad_quantizer():
    class Sloppy(Quantizer):
        name = "sloppy"

        def quantize(self, weight):
            return nn.Linear(weight.shape[1], weight.shape[0], bias=False)  # ignores the weight

    with pytest.raises(ContractError, match="relative error"):
        check_quantizer(Sloppy())


def test_quantize_model_swaps_every_linear_and_checks_first(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32)
    ids = list(range(3, 40))
    before = llm.score(ids)
    quantize_model(llm.model, Int8WeightOnly())
    assert not any(isinstance(m, nn.Linear) for n, m in llm.model.named_modules() if n.startswith("model.layers"))
    after = llm.score(ids)
    assert abs(after.perplexity / before.perplexity - 1) < 0.01
    with pytest.raises(ConfigError, match="not a multiple of group_size 256"):
        quantize_model(tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32).model,
                       Int4WeightOnly(group_size=256))


def test_quantization_by_name_in_llm(tiny_hf_dir):
    fp32 = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32)
    ids = list(range(3, 60))
    # loose bounds: a random tiny model is no quality measure (bench/quant.py is), only a smoke check
    for name, bound in (("int8", 0.02), ("int4", 0.25), ("nf4", 0.25), ("fp8", 0.05)):
        quantized = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32, quantization=name)
        assert abs(quantized.score(ids).perplexity / fp32.score(ids).perplexity - 1) < bound, name
    with pytest.raises(ConfigError, match="unknown quantizer 'int2'"):
        tandem.LLM(str(tiny_hf_dir), progress=False, quantization="int2")


def test_int8_kv_cache_round_trip_and_generation(tiny_hf_dir):
    check_kv_cache_format(Int8KVCache(), max_relative_error=0.01)
    fp32 = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32)
    int8 = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32, kv_cache_dtype="int8")
    assert int8.engine.runner.k_pools[0].data.dtype == torch.int8
    # the second token is the first one computed from the (quantized) cache; greedy continuations
    # of a random tiny model diverge for good after one flip, so compare one decode step per prompt
    params = tandem.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    prompts = [list(range(3 + i, 30 + 2 * i)) for i in range(20)]
    pairs = zip(fp32.generate(prompts, params), int8.generate(prompts, params))
    assert sum(x.token_ids == y.token_ids for x, y in pairs) >= 18
    # the same memory budget holds ~3.8x the tokens (64 + 4 bytes per head instead of 256)
    fmt = Int8KVCache()
    assert fmt.bytes_per_token(30, 3, 64, torch.float32) * 3.7 < 2 * 30 * 3 * 64 * 4


@pytest.mark.parametrize("quantizer", [NF4, FP8])
def test_working_copy_is_the_dequantized_weight_in_bf16_and_can_be_turned_off(quantizer):
    """By default nf4/fp8 multiply a bf16 copy of their dequantized weight (faster than fp32);
    working_copy=False keeps only the packed weight and dequantizes every call."""
    x = torch.randn(3, W.shape[1])
    fast, small = quantizer().quantize(W), quantizer(working_copy=False).quantize(W)
    assert fast.work.dtype == torch.bfloat16 and torch.equal(fast.work, small.dequantize().to(torch.bfloat16))
    assert small.work is None
    exact = x @ small.dequantize().T
    torch.testing.assert_close(small(x), exact)
    assert float((fast(x) - exact).norm() / exact.norm()) < 1e-2  # bf16 rounding of x and W
    with pytest.raises(ConfigError, match="working_copy"):
        quantizer(working_copy="yes")

"""The Triton quantizer plugins (int8_triton, int4_triton): the contract suite run through the
kernels (Triton's interpreter on the CPU), their values against the built-in int8/int4, and a tiny
model quantized with int4_triton giving the same logits and greedy tokens through the kernels as
through the torch reference."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tandem.kernels import quantized_matmul as kernels
from tandem.kernels._utils import is_interpreting
from tandem.plugins import triton_quantizers
from tandem.plugins.quantizers import Int4WeightOnly
from tandem.plugins.testing import check_quantizer
from tandem.plugins.triton_quantizers import Int4Triton, Int8Triton, TritonInt4Linear, TritonInt8Linear

pytestmark = pytest.mark.skipif(not is_interpreting(), reason="runs the kernels in Triton's CPU interpreter")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton wrapper (the plugin looks it up on the module at each call)."""
    calls = []
    original = kernels.quantized_matmul_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])  # M
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "quantized_matmul_triton", counted)
    return calls


@pytest.mark.parametrize("quantizer, tolerance", [(Int8Triton(), 0.01), (Int4Triton(), 0.1),
                                                  (Int4Triton(group_size=64), 0.12), (Int4Triton(group_size=128), 0.15)],
                         ids=["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_triton_quantizers_pass_the_contract_suite_through_the_kernels(quantizer, tolerance, kernel_calls):
    check_quantizer(quantizer, max_relative_error=tolerance)
    assert 1 in kernel_calls and 10 in kernel_calls  # the GEMV (one row) and the GEMM (2 x 5 rows)


def test_int4_triton_holds_the_builtin_int4_values():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    module = Int4Triton(group_size=64).quantize(weight)
    assert isinstance(module, TritonInt4Linear) and module.qweight.shape == (16, 128)
    builtin = Int4WeightOnly(group_size=64).quantize(weight)
    assert torch.equal(builtin.scales_zeros[..., 0].T, module.scales)
    assert torch.equal(builtin.scales_zeros[..., 1].T, module.zeros)
    assert isinstance(Int4Triton().head_quantizer(), Int8Triton)
    assert isinstance(Int8Triton().quantize(weight), TritonInt8Linear)


def test_bad_group_size_is_a_config_error():
    with pytest.raises(ConfigError, match="group_size must be one of"):
        Int4Triton(group_size=256)
    with pytest.raises(ConfigError, match="not a multiple of group_size 128"):
        Int4Triton(group_size=128).check("w", torch.zeros(8, 64))
    with pytest.raises(ConfigError, match="output channels are odd"):
        Int4Triton().check("w", torch.zeros(7, 64))


def test_tiny_model_gives_the_same_output_through_the_kernels_as_through_the_reference(tiny_hf_dir, kernel_calls,
                                                                                        monkeypatch):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=32, quantization="int4_triton")
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, TritonInt4Linear)
    assert isinstance(llm.model.lm_head, TritonInt8Linear)
    ids = list(range(3, 30))
    params = tandem.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(5, 17)), list(range(40, 49))]

    kernel_score, kernel_tokens = llm.score(ids), [o.token_ids for o in llm.generate(prompts, params)]
    assert min(kernel_calls) <= kernels.GEMV_MAX_M < max(kernel_calls)  # decode GEMVs and prefill GEMMs ran
    num_calls = len(kernel_calls)
    monkeypatch.setattr(triton_quantizers, "_use_triton", lambda x: False)
    reference_score, reference_tokens = llm.score(ids), [o.token_ids for o in llm.generate(prompts, params)]
    assert len(kernel_calls) == num_calls  # the reference path did not touch the kernels

    torch.testing.assert_close(torch.tensor(kernel_score.logprobs), torch.tensor(reference_score.logprobs),
                               atol=1e-4, rtol=1e-4)
    assert kernel_score.argmax_ids == reference_score.argmax_ids
    assert kernel_tokens == reference_tokens

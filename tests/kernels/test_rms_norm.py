"""rms_norm: the Triton kernel (interpreted on the CPU) against its torch reference, and the
reference against tandem's own RMSNorm module, with and without the fused residual add."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels._utils import is_interpreting
from tandem.kernels.rms_norm import rms_norm, rms_norm_reference, rms_norm_triton
from tandem.model.llama import RMSNorm

# kernel vs reference: both normalise in fp32 and round once, so they differ by the fp32 sum order
# (and, interpreted, by the bf16 rounding below); bf16 rtol is torch.testing's default
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 1.6e-2)]
# x + residual is one rounded add: exact, except that Triton 3.9's interpreter truncates fp32 -> bf16
# where GPUs (and torch) round to nearest even: one bf16 ulp (2^-7 relative at most) there
_ADD_RTOL = {torch.float32: 0, torch.float16: 0,
             torch.bfloat16: 2 ** -7 if is_interpreting() else 0}
SHAPES = [(1, 64), (7, 100), (3, 5, 33), (2, 1000)]  # ragged N (not a power of two), 3-d input


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype)
    return x.to(device), weight.to(device), residual.to(device)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_reference(shape, dtype, atol, rtol, device):
    x, weight, _ = _inputs(shape, dtype, device)
    out = rms_norm_triton(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-5), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_residual_add_matches_the_reference_and_leaves_inputs_alone(shape, dtype, atol, rtol, device):
    x, weight, residual = _inputs(shape, dtype, device)
    x_before, residual_before = x.clone(), residual.clone()
    out, residual_out = rms_norm_triton(x, weight, 1e-6, residual=residual)
    expected_out, expected_residual = rms_norm_reference(x, weight, 1e-6, residual=residual)
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=_ADD_RTOL[dtype])
    torch.testing.assert_close(out, expected_out, atol=atol, rtol=rtol)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # not in place


def test_strided_rows_are_read_through_their_stride(device):
    x, weight, _ = _inputs((6, 96), torch.float32, device)
    rows = x[::2]  # (3, 96), row stride 192
    torch.testing.assert_close(rms_norm_triton(rows, weight), rms_norm_reference(rows.contiguous(), weight))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_reference_matches_tandems_rmsnorm_module(dtype, atol, rtol, device):
    """The model's RMSNorm (fp32 weight, activations in dtype) and a decoder layer's residual step."""
    x, _, residual = _inputs((5, 64), dtype, device)
    norm = RMSNorm(64, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1)))
        expected = norm(x)
        out = rms_norm_reference(x, norm.weight, 1e-5)
        # tandem: x = x + attn(...); post_attention_layernorm(x)
        fused_out, fused_residual = rms_norm_reference(x, norm.weight, 1e-5, residual=residual)
        summed = residual + x
    exact = dtype != torch.float32  # fp32 takes F.rms_norm's fused op there: a different sum order
    torch.testing.assert_close(out, expected, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)
    torch.testing.assert_close(fused_residual, summed, atol=0, rtol=0)
    torch.testing.assert_close(fused_out, norm(summed), atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)
    torch.testing.assert_close(rms_norm_triton(x, norm.weight, 1e-5), expected, atol=atol, rtol=rtol)


def test_bad_arguments_raise_clear_errors(device):
    x, weight, residual = _inputs((4, 32), torch.float32, device)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_triton(x, weight[:16])
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm_triton(x, weight, residual=residual.half())
    with pytest.raises(ValueError, match="contiguous along its last dimension"):
        rms_norm_triton(x.t(), torch.ones(4, device=device))


def test_dispatch_takes_the_reference_on_the_cpu(monkeypatch):
    import tandem.kernels.rms_norm as module

    monkeypatch.setattr(module, "rms_norm_triton", lambda *a, **k: pytest.fail("the kernel ran on CPU tensors"))
    x, weight, _ = _inputs((2, 16), torch.float32, "cpu")
    torch.testing.assert_close(rms_norm(x, weight), rms_norm_reference(x, weight))

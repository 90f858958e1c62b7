"""silu_and_mul: the Triton kernel (interpreted on the CPU) against its torch reference, and the
reference against tandem's MLP (its fused gate/up projection, chunked)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import silu_and_mul as module
from tandem.kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference, silu_and_mul_triton

# both compute in fp32 and round once (the interpreter truncates to bf16: one more ulp)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 1.6e-2)]


def _x(shape, dtype, device, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype).to(device)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 64), (5, 2 * 100), (2, 3, 2 * 37), (4, 2 * 1500)],
                         ids=["one", "pow2", "ragged", "3d", "two-blocks"])
def test_kernel_matches_the_reference(shape, dtype, atol, rtol, monkeypatch, device):
    monkeypatch.setattr(module, "BLOCK_I", 1024)  # 1500 outputs per row: two programs, one masked
    x = _x(shape, dtype, device)
    out = silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_reference(x), atol=atol, rtol=rtol)


def test_strided_rows_are_read_through_their_stride(device):
    x = _x((6, 2 * 48), torch.float32, device)
    torch.testing.assert_close(silu_and_mul_triton(x[1::2]), silu_and_mul_reference(x[1::2].contiguous()))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_reference_matches_tandems_mlp_activation(dtype, atol, rtol, device):
    """tandem.model.llama.MLP: gate, up = gate_up_proj(x).chunk(2, -1); F.silu(gate) * up."""
    x = _x((7, 2 * 40), dtype, device)
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up  # rounds silu's result first in fp16/bf16: one ulp apart at most
    torch.testing.assert_close(silu_and_mul_reference(x), expected, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        torch.testing.assert_close(silu_and_mul_reference(x), expected, atol=0, rtol=0)


def test_bad_arguments_raise_clear_errors(device):
    with pytest.raises(ValueError, match="must be \\(..., 2 \\* I\\)"):
        silu_and_mul_triton(_x((3, 7), torch.float32, device))
    with pytest.raises(ValueError, match="floating point"):
        silu_and_mul_triton(torch.ones(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="contiguous along its last dimension"):
        silu_and_mul_triton(_x((8, 4), torch.float32, device).t())


def test_dispatch_takes_the_reference_on_the_cpu(monkeypatch):
    monkeypatch.setattr(module, "silu_and_mul_triton", lambda x: pytest.fail("the kernel ran on CPU tensors"))
    x = _x((2, 8), torch.float32, "cpu")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x))

"""quantized_matmul: the Triton GEMV and GEMM kernels (interpreted on the CPU) against the
reference, over ragged M / N / K, the three int4 group sizes, int8, and three activation dtypes;
the reference against x @ W.T with W dequantized by formulas written out here; the layout's
quantize/pack helpers against tandem's own int8/int4 quantizers (the same rounded values)."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels import quantized_matmul as module
from tandem.kernels.quantized_matmul import (
    GEMV_MAX_M, dequantize, pack_int4, quantize_int4, quantize_int8, quantized_matmul, quantized_matmul_reference,
    quantized_matmul_triton, unpack_int4)
from tandem.plugins.quantizers import Int4WeightOnly, Int8WeightOnly

# Kernel vs reference (both dequantize exactly and accumulate in fp32): fp32 differs by the sum
# order; fp16/bf16 by the output's rounding (bf16: plus the interpreter's truncation, one ulp).
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-3, 1e-3), (torch.bfloat16, 2e-2, 1.6e-2)]
FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]
FORMAT_IDS = ["int8", "int4-g32", "int4-g64", "int4-g128"]


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _quantized(n, k, bits, group_size, device, seed=0):
    """(qweight, scales, zeros) on device."""
    weight = _weight(n, k, seed)
    parts = quantize_int8(weight) + (None,) if bits == 8 else quantize_int4(weight, group_size)
    return tuple(None if t is None else t.to(device) for t in parts)


def _x(m, k, dtype, device, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17], ids=["gemv-1", "gemv-3", "gemm-17"])
@pytest.mark.parametrize("bits, group_size", FORMATS, ids=FORMAT_IDS)
def test_kernels_match_the_reference(bits, group_size, m, dtype, atol, rtol, device):
    # N fills no tile exactly (int8: odd, a lone last channel; int4 packs channel pairs: even);
    # K = 3 groups (int4) or 200 (int8) fills no K tile either
    n, k = (101, 200) if bits == 8 else (102, 3 * group_size)
    qweight, scales, zeros = _quantized(n, k, bits, group_size, device)
    x = _x(m, k, dtype, device)
    out = quantized_matmul_triton(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    assert out.shape == (m, n) and out.dtype == dtype
    expected = quantized_matmul_reference(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("bits, group_size", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("split_k, block_n, block_k", [(2, 16, 64), (3, 8, 128), (4, 32, 256)])
def test_gemv_split_k_and_tile_overrides(bits, group_size, split_k, block_n, block_k, device):
    """Split-K partial sums and their second pass; tiles smaller than N and K (many programs)."""
    n, k = (45, 280) if bits == 8 else (46, 4 * group_size)
    qweight, scales, zeros = _quantized(n, k, bits, group_size, device, seed=2)
    x = _x(2, k, torch.float32, device)
    out = quantized_matmul_triton(x, qweight, scales, zeros, bits=bits, group_size=group_size,
                                  split_k=split_k, block_n=block_n, block_k=block_k)
    expected = quantized_matmul_reference(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, group_size", FORMATS, ids=FORMAT_IDS)
def test_gemm_with_several_m_and_n_tiles_and_a_strided_x(bits, group_size, device):
    n, k = 70, 2 * (group_size or 64)
    qweight, scales, zeros = _quantized(n, k, bits, group_size, device, seed=3)
    x = _x(40, 2 * k, torch.float16, device)[:, ::2]  # (40, K), column stride 2
    out = quantized_matmul_triton(x, qweight, scales, zeros, bits=bits, group_size=group_size, block_n=32)
    expected = quantized_matmul_reference(x.contiguous(), qweight, scales, zeros, bits=bits, group_size=group_size)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-3)


def test_gemv_and_gemm_agree_on_the_same_rows(device):
    qweight, scales, zeros = _quantized(64, 128, 4, 32, device)
    x = _x(GEMV_MAX_M + 5, 128, torch.float32, device)
    gemm = quantized_matmul_triton(x, qweight, scales, zeros, bits=4, group_size=32)
    gemv = quantized_matmul_triton(x[:GEMV_MAX_M], qweight, scales, zeros, bits=4, group_size=32)
    torch.testing.assert_close(gemv, gemm[:GEMV_MAX_M], atol=1e-5, rtol=1e-5)


# -- the reference and the layout against independent formulas and tandem's quantizers ---------

@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layout_is_tandems_int4_convention(group_size):
    weight = _weight(48, 256, seed=4)
    qweight, scales, zeros = quantize_int4(weight, group_size)
    # written out: w ~= (q - 8) * scale + zero per group, scale/zero rounded to bf16, q in [0, 15]
    groups = weight.view(48, 256 // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((groups - zero) / scale + 8).round().clamp(0, 15)
    assert qweight.shape == (24, 256) and torch.equal(unpack_int4(qweight).float(), q.view(48, 256))
    assert torch.equal(qweight & 0xF, q.view(48, 256)[0::2].to(torch.uint8))  # channel 2p: low nibble of row p
    assert torch.equal(qweight >> 4, q.view(48, 256)[1::2].to(torch.uint8))  # channel 2p + 1: high nibble
    assert torch.equal(scales.float(), scale.squeeze(-1)) and torch.equal(zeros.float(), zero.squeeze(-1))
    # the same scales and zeros as the built-in CPU "int4" quantizer stores (K / group, N, 2)
    cpu = Int4WeightOnly(group_size=group_size).quantize(weight)
    assert torch.equal(cpu.scales_zeros[..., 0].T, scales) and torch.equal(cpu.scales_zeros[..., 1].T, zeros)
    dequantized = ((q - 8) * scale + zero).view(48, 256)
    assert torch.equal(dequantize(qweight, scales, zeros, bits=4, group_size=group_size), dequantized)
    x = _x(5, 256, torch.float32, "cpu")
    torch.testing.assert_close(quantized_matmul_reference(x, qweight, scales, zeros, bits=4, group_size=group_size),
                               x @ dequantized.T, atol=1e-5, rtol=1e-5)


def test_int8_layout_is_tandems_int8_convention():
    weight = _weight(48, 96, seed=5)
    qweight, scales = quantize_int8(weight)
    scale = (weight.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    q = (weight / scale.unsqueeze(1)).round().clamp(-127, 127)
    assert torch.equal(qweight.float(), q) and torch.equal(scales.float(), scale)
    cpu = Int8WeightOnly().quantize(weight)
    assert torch.equal(cpu.qweight, qweight) and torch.equal(cpu.scales, scales)
    x = _x(3, 96, torch.float32, "cpu")
    torch.testing.assert_close(quantized_matmul_reference(x, qweight, scales, bits=8),
                               x @ (q * scale.unsqueeze(1)).T, atol=1e-5, rtol=1e-5)


def test_pack_and_unpack_round_trip():
    q = torch.randint(0, 16, (6, 12), generator=torch.Generator().manual_seed(6))
    packed = pack_int4(q)
    assert packed.shape == (3, 12) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))
    with pytest.raises(ValueError, match="N even"):
        pack_int4(q[:5])


def test_bad_arguments_raise_clear_errors(device):
    qweight, scales, zeros = _quantized(32, 64, 4, 32, device)
    x = _x(2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantized_matmul_triton(x, qweight, scales, zeros, bits=4, group_size=48)
    with pytest.raises(ValueError, match="scales and zeros must be"):
        quantized_matmul_triton(x, qweight, scales, None, bits=4, group_size=32)
    with pytest.raises(ValueError, match="int4 qweight must be"):
        quantized_matmul_triton(x, qweight[:, :32], scales, zeros, bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales and zeros must be"):
        quantized_matmul_triton(_x(2, 32, torch.float32, device), qweight, scales, zeros, bits=4, group_size=32)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 32"):
        quantized_matmul_triton(_x(8, 64, torch.float32, device), qweight, scales, zeros, bits=4, group_size=32,
                                block_n=16)
    with pytest.raises(ValueError, match="x must be"):
        quantized_matmul_triton(x.to(torch.int32), qweight, scales, zeros, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantized_matmul_triton(x, qweight, scales, zeros, bits=3, group_size=32)
    q8, s8, _ = _quantized(32, 64, 8, None, device)
    with pytest.raises(ValueError, match="no zeros"):
        quantized_matmul_triton(x, q8, s8, s8, bits=8)
    with pytest.raises(ValueError, match="contiguous along their last dimension"):
        quantized_matmul_triton(x, q8.t().contiguous().t(), s8, bits=8)


def test_dispatch_takes_the_reference_on_the_cpu(monkeypatch):
    monkeypatch.setattr(module, "quantized_matmul_triton", lambda *a, **k: pytest.fail("the kernel ran on CPU"))
    qweight, scales, zeros = _quantized(16, 64, 4, 64, "cpu")
    x = _x(1, 64, torch.float32, "cpu")
    torch.testing.assert_close(quantized_matmul(x, qweight, scales, zeros, bits=4, group_size=64),
                               quantized_matmul_reference(x, qweight, scales, zeros, bits=4, group_size=64))

"""SwiGLU's activation (Shazeer 2020): silu(gate) * up on the packed gate/up projection.

The MLP's gate and up projections run as one matmul (tandem.model.llama.MLP.fuse, vLLM's
MergedColumnParallelLinear), so x (..., 2I) holds gate in [..., :I] and up in [..., I:]; this
kernel (vLLM's `silu_and_mul`) reads both halves once and writes (..., I). The math is fp32 and
rounds once to x's dtype; the model's `F.silu(gate) * up` rounds silu's result first, so the two
agree exactly in fp32 and within a rounding step in fp16/bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_I = 1024  # outputs per program; untuned (no GPU measured yet)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x_row, stride_out_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs_i < I
    gate = tl.load(x_ptr + row * stride_x_row + offs_i, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + I + offs_i, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out_row + offs_i, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be (..., 2 * I) with I > 0, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: x (..., 2I) -> silu(x[..., :I]) * x[..., I:] (..., I) in x's dtype."""
    _check(x)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError(f"x must be contiguous along its last dimension, got strides {tuple(x.stride())}")
    inner = x.shape[-1] // 2
    out = torch.empty(rows.shape[0], inner, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        grid = (rows.shape[0], triton.cdiv(inner, BLOCK_I))
        _silu_and_mul_kernel[grid](rows, out, inner, rows.stride(0), out.stride(0), BLOCK=BLOCK_I)
    return out.view(*x.shape[:-1], inner)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch, same signature and numerics as silu_and_mul_triton."""
    _check(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a packed (..., 2I) tensor: the Triton kernel on CUDA tensors, the torch
    reference elsewhere."""
    return silu_and_mul_triton(x) if x.is_cuda else silu_and_mul_reference(x)

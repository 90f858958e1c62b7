"""RMSNorm (Zhang & Sennrich 2019), optionally fused with the residual add before it.

One program normalises one row, whole, in registers (Liger-Kernel's and the Triton tutorial's
layer-norm shape: hidden sizes up to a few thousand fit one block). The fused form follows vLLM's
`fused_add_rms_norm`: residual_out = x + residual, then the norm of residual_out, in one pass over
memory instead of three. Unlike vLLM's it is NOT in place: both results are new tensors and the
inputs are left untouched (the model keeps the residual stream in its own variable anyway).

Numerics match tandem.model.llama.RMSNorm: the sum x + residual is rounded to x's dtype first (as
`x = x + attn(x)` is in the model), the norm is taken in fp32, the weight multiplies in fp32, and
the product is cast to x's dtype once at the end (HF casts before the weight multiply; tandem
does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_N = 65536  # one block per row (Liger-Kernel's bound for this kernel shape)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     N, eps,
                     stride_x, stride_residual, stride_out, stride_residual_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < N
    x = tl.load(x_ptr + row * stride_x + offs_n, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs_n, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # rounded as the model's add is
        tl.store(residual_out_ptr + row * stride_residual_out + offs_n, x, mask=mask)
    x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    weight = tl.load(weight_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_n, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_n: int) -> int:
    """Liger-Kernel's `calculate_settings` for one-row-per-program kernels (untuned here: no GPU yet)."""
    return 32 if block_n >= 32768 else 16 if block_n >= 8192 else 8 if block_n >= 2048 else 4


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """t (..., N) as (rows, N) with unit stride along N (a view when possible)."""
    if t.shape[-1] != n:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}, expected {n}")
    rows = t.reshape(-1, n)
    if rows.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension, got strides {tuple(t.stride())}")
    return rows


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., N) with N > 0, got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x: {tuple(x.shape)} {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """The Triton kernel. x (..., N); weight (N,); residual like x or None.
    Returns rms_norm(x) (..., N) in x's dtype, or (rms_norm(x + residual), x + residual)."""
    _check(x, weight, residual)
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"rows of {n} elements exceed the one-block kernel's {MAX_N}")
    x_rows = _rows(x, "x", n)
    if weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    out = torch.empty_like(x_rows)
    residual_rows = x_rows if residual is None else _rows(residual, "residual", n)
    residual_out = out if residual is None else torch.empty_like(x_rows)
    # one row per program, the whole row in one block: no second pass over memory
    block_n = triton.next_power_of_2(n)
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight, out, residual_out, n, eps,
        x_rows.stride(0), residual_rows.stride(0), out.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Plain torch, same signature and numerics as rms_norm_triton."""
    _check(x, weight, residual)
    summed = x if residual is None else x + residual  # (..., N) in x's dtype
    normed = F.rms_norm(summed.float(), (x.shape[-1],), eps=eps) * weight.float()
    out = normed.to(x.dtype)
    return out if residual is None else (out, summed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm of x (..., N), or (norm of x + residual, x + residual): the Triton kernel on CUDA
    tensors, the torch reference elsewhere."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)

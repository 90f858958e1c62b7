"""The gathered low-rank matmul of multi-LoRA serving (Punica's BGMV: batched gather matrix-vector):
each token n multiplies by its own adapter's A and B, out[n] = scaling[s] * B[s] (A[s] x[n]),
s = slots[n], zeros where s = -1 (the bare base model).

    bgmv(x (N, in), a (S, R, in), b (S, out, R), slots (N,) int64, scaling (S,)) -> (N, out)
    lora_delta_triton(x, a (S, P R, in), bt (S, R, out), part_outs, scaling, slots) -> (N, out)

One program per (token, BLOCK_N output columns): it gathers its token's adapter, computes the
R-vector A x in BLOCK_K slices, then its block of B (A x). A and B may be strided views (A's rows
and B's columns need not be contiguous), so `lora_delta_triton` runs the model's own layout
(tandem.model.lora.LoRAProjection: a fused projection's parts stacked in A, each part's B^T on its
output columns) as one launch per part, with no copy. tandem.LLM installs it on a CUDA model's
LoRAContext; its references are tandem.model.lora.bgmv and lora_delta (the CPU path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.model.lora import bgmv as bgmv_reference

BLOCK_N, BLOCK_K = 64, 64  # untuned (no GPU measured yet)


@triton.jit
def _bgmv_kernel(x_ptr, a_ptr, b_ptr, slots_ptr, scaling_ptr, out_ptr, K, N, R,
                 stride_xm, stride_as, stride_ar, stride_bs, stride_bn, stride_br, stride_om,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if slot < 0:
        tl.store(out_ptr + token * stride_om + offs_n, tl.zeros((BLOCK_N,), dtype=tl.float32).to(
            out_ptr.dtype.element_ty), mask=offs_n < N)
        return
    slot = slot.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    low = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        low += tl.sum(a * x[None, :], axis=1)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
    out = tl.sum(b * low[None, :], axis=1) * tl.load(scaling_ptr + slot).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def bgmv_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                scaling: torch.Tensor, groups=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """groups: the reference's slot grouping, unused here (each program reads its token's slot).
    a and b may be strided views as long as a's last dimension is contiguous; out: where to write
    (a view of a wider output: one part of a fused projection)."""
    tokens, fan_in = x.shape
    fan_out, rank = b.shape[1], b.shape[2]
    if out is None:
        out = torch.empty(tokens, fan_out, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    x = x.contiguous()
    if a.stride(2) != 1:
        a = a.contiguous()
    grid = (tokens, triton.cdiv(fan_out, BLOCK_N))
    _bgmv_kernel[grid](x, a, b, slots.contiguous(), scaling.to(x.device).contiguous(), out, fan_in, fan_out, rank,
                       x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
                       BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def bgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
         scaling: torch.Tensor, groups=None) -> torch.Tensor:
    return bgmv_triton(x, a, b, slots, scaling) if x.is_cuda else bgmv_reference(x, a, b, slots, scaling, groups)


def lora_delta_triton(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, part_outs: list[int],
                      scaling: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """tandem.model.lora.lora_delta's contract on the kernel: x (N, in), a (S, P R, in),
    bt (S, R, out), part_outs: the parts' widths, slots (N,) (-1: none) -> (N, out) in x's dtype.
    One launch per part: that part's rows of A, its columns of B^T seen as B (S, width, R)."""
    rank = bt.shape[1]
    out = torch.empty(x.shape[0], bt.shape[2], dtype=x.dtype, device=x.device)
    slots = slots.to(x.device)
    start = 0
    for part, width in enumerate(part_outs):
        bgmv_triton(x, a[:, part * rank:(part + 1) * rank], bt[:, :, start:start + width].transpose(1, 2), slots,
                    scaling, out=out[:, start:start + width])
        start += width
    return out

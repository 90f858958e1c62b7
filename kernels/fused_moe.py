"""A mixture-of-experts feed-forward layer in two grouped matmuls (vLLM's fused_moe shape).

Each token's top-k (token, expert) assignments are sorted by expert and each expert's segment is
padded to a multiple of BLOCK_M (`align`: torch ops only, no host loop), so that every BLOCK_M-row
tile of the sorted list belongs to one expert. One Triton kernel then runs every tile's matmul
against its expert's weights in a single launch: first x @ gate_up[e]^T for the (2I) gate/up
outputs, then, after silu(gate) * up, act @ down[e]^T scaled by the router's weight. The tiles'
results are summed into their tokens (index_add_, in expert order).

    fused_moe(x (N, d), gate_up (E, 2I, d), down (E, d, I), top_i (N, k) int64, top_w (N, k))
        -> (N, d) in x's dtype

`fused_moe_reference` is the same computation in plain torch, one matmul pair per expert that has
tokens (tandem.model.moe.experts_forward, the CPU path); `fused_moe` runs the kernel on CUDA
tensors and the reference elsewhere. On a GPU, tandem.LLM installs the kernel in every MoE layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.silu_and_mul import silu_and_mul
from tandem.model.moe import experts_forward

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32  # untuned (no GPU measured yet); BLOCK_M is the padding unit


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, out_ptr, rows_ptr, tile_expert_ptr, scale_ptr, K, N,
                           stride_am, stride_we, stride_wn, stride_wk, stride_om,
                           ROWS_ARE_TOKENS: tl.constexpr, TOP_K: tl.constexpr, SCALE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, n] = sum_k a[src(r), k] * w[e, n, k] (* scale[assignment of r]) for the BLOCK_M padded
    rows r of one tile, e its expert; padding rows (rows[r] < 0) are skipped."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(rows_ptr + offs_m)
    valid = assignment >= 0
    src = (assignment // TOP_K) if ROWS_ARE_TOKENS else offs_m  # x's token, or the padded row itself
    src = tl.where(valid, src, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + src[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
    if SCALE:
        acc *= tl.load(scale_ptr + tl.where(valid, assignment, 0), mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _check(x, gate_up, down, top_i, top_w) -> None:
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError("x must be (N, d), gate_up (E, 2I, d), down (E, d, I)")
    e, two_i, d = gate_up.shape
    if x.shape[1] != d or two_i % 2 or tuple(down.shape) != (e, d, two_i // 2):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)}")
    if top_i.shape != top_w.shape or top_i.dim() != 2 or top_i.shape[0] != x.shape[0]:
        raise ValueError(f"top_i and top_w must both be (N, k), got {tuple(top_i.shape)}, {tuple(top_w.shape)}")
    if top_i.numel() and (int(top_i.min()) < 0 or int(top_i.max()) >= e):
        raise ValueError(f"top_i names an expert outside [0, {e})")


def align(top_i: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (P,), tile_expert (P / block_m,)): the assignments (token * k + slot) sorted by expert,
    each expert's run padded with -1 to a multiple of block_m, and each tile's expert."""
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    start, padded_start = torch.cumsum(counts, 0) - counts, torch.cumsum(padded, 0) - padded
    expert = flat[order]
    dest = padded_start[expert] + torch.arange(flat.numel(), device=flat.device) - start[expert]
    rows = torch.full((int(padded.sum()),), -1, dtype=torch.int64, device=flat.device)
    rows[dest] = order
    tile_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_m)
    return rows, tile_expert


def fused_moe_triton(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_i: torch.Tensor,
                     top_w: torch.Tensor) -> torch.Tensor:
    """The Triton path (see the module docstring); fp32 accumulation, results in x's dtype."""
    _check(x, gate_up, down, top_i, top_w)
    n, k = top_i.shape
    e, two_i, d = gate_up.shape
    out = torch.zeros_like(x)
    if n == 0:
        return out
    rows, tile_expert = align(top_i, e, BLOCK_M)
    x, scale = x.contiguous(), top_w.reshape(-1).contiguous()
    hidden = torch.empty(rows.numel(), two_i, dtype=x.dtype, device=x.device)
    _grouped_matmul_kernel[(tile_expert.numel(), triton.cdiv(two_i, BLOCK_N))](
        x, gate_up, hidden, rows, tile_expert, scale, d, two_i, x.stride(0), *gate_up.stride(), hidden.stride(0),
        ROWS_ARE_TOKENS=True, TOP_K=k, SCALE=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    act = silu_and_mul(hidden)
    result = torch.empty(rows.numel(), d, dtype=x.dtype, device=x.device)
    _grouped_matmul_kernel[(tile_expert.numel(), triton.cdiv(d, BLOCK_N))](
        act, down, result, rows, tile_expert, scale, two_i // 2, d, act.stride(0), *down.stride(), result.stride(0),
        ROWS_ARE_TOKENS=False, TOP_K=k, SCALE=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    valid = rows >= 0
    return out.index_add_(0, rows[valid] // k, result[valid])


def fused_moe_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_i: torch.Tensor,
                        top_w: torch.Tensor) -> torch.Tensor:
    """Plain torch, the same signature: tandem.model.moe.experts_forward (the CPU path), checked."""
    _check(x, gate_up, down, top_i, top_w)
    return experts_forward(x, gate_up, down, top_i, top_w)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_i: torch.Tensor,
              top_w: torch.Tensor) -> torch.Tensor:
    """The MoE feed-forward: the Triton kernel on CUDA tensors, the torch reference elsewhere."""
    return fused_moe_triton(x, gate_up, down, top_i, top_w) if x.is_cuda else fused_moe_reference(
        x, gate_up, down, top_i, top_w)

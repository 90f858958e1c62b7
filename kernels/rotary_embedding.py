"""Rotary position embedding (Su et al., RoFormer) applied to queries and keys in place.

vLLM's `rotary_embedding` op in Triton: one program per token rotates all of its query heads and
key heads, reading cos/sin once from a (max_position, D_rot / 2) table. Two pair layouts, one
kernel (the `INTERLEAVED` constexpr picks how a pair is loaded):

- neox (interleaved=False): dimension i pairs with i + D_rot/2 (GPT-NeoX, HF Llama, tandem's
  internal layout: tandem.model.rope.apply_rotary's `rotate_half`);
- interleaved (True): dimension 2i pairs with 2i + 1 (GPT-J, llama.cpp / GGUF llama).

Pair i turns by angle i: out_a = a cos - b sin, out_b = b cos + a sin. Only the first D_rot =
2 * cos.shape[1] dimensions of each head rotate (partial rotary, as GPT-NeoX/Phi use it); the rest
are left as they are. tandem.model.rope.RotaryEmbedding's tables are (P, D) in the neox layout
(each frequency repeated); their first half, `rope.cos[:, :D // 2]`, is this module's table (any
attention factor is already folded in). The math is fp32 and rounds once to q's dtype; tandem's
apply_rotary rounds after each op in the activation dtype, so the two agree exactly in fp32 and
within a rounding step in fp16/bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 2048  # (head, pair) elements per loop step of a program; untuned (no GPU measured yet)


@triton.jit
def _turn(a, b, cos, sin):
    """Rotate pairs (a, b) by the angles of cos, sin (BLOCK_HALF,) fp32, in fp32; back in a's dtype."""
    a32, b32 = a.to(tl.float32), b.to(tl.float32)
    new_a = a32 * cos[None, :] - b32 * sin[None, :]
    new_b = b32 * cos[None, :] + a32 * sin[None, :]
    return new_a.to(a.dtype), new_b.to(b.dtype)


@triton.jit
def _rotate_heads(x_ptr, stride_x_token, stride_x_head, token, num_heads, cos, sin,
                  INTERLEAVED: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the heads of one token of x (N, H, D) in place, BLOCK_H heads at a time."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    for h in range(0, num_heads, BLOCK_H):
        heads = h + offs_h
        mask = (heads[:, None] < num_heads) & (offs_d[None, :] < HALF)  # (BLOCK_H, BLOCK_HALF)
        row_ptr = x_ptr + token * stride_x_token + heads[:, None] * stride_x_head  # (BLOCK_H, 1)
        if INTERLEAVED:  # pairs (2i, 2i + 1): load them whole (contiguous, vectorized), then split
            pair_ptrs = row_ptr[:, :, None] + (2 * offs_d[:, None] + tl.arange(0, 2)[None, :])[None, :, :]
            a, b = tl.split(tl.load(pair_ptrs, mask=mask[:, :, None], other=0.0))
            a, b = _turn(a, b, cos, sin)
            tl.store(pair_ptrs, tl.join(a, b), mask=mask[:, :, None])
        else:  # pairs (i, i + D_rot / 2): two contiguous halves
            a = tl.load(row_ptr + offs_d[None, :], mask=mask, other=0.0)
            b = tl.load(row_ptr + HALF + offs_d[None, :], mask=mask, other=0.0)
            a, b = _turn(a, b, cos, sin)
            tl.store(row_ptr + offs_d[None, :], a, mask=mask)
            tl.store(row_ptr + HALF + offs_d[None, :], b, mask=mask)


@triton.jit
def _rotary_embedding_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
                             num_heads, num_kv_heads,
                             stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_table,
                             INTERLEAVED: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + position * stride_table + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_table + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_q_token, stride_q_head, token, num_heads, cos, sin,
                  INTERLEAVED, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_k_token, stride_k_head, token, num_kv_heads, cos, sin,
                  INTERLEAVED, HALF, BLOCK_H, BLOCK_HALF)


def _check(q, k, positions, cos, sin) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be (N, H, D) and (N, H_kv, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be ({q.shape[0]},) int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must be (max_position, D_rot / 2) alike, got {tuple(cos.shape)} "
                         f"{cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    if not 0 < 2 * cos.shape[1] <= q.shape[2]:
        raise ValueError(f"the rotary dimension 2 * {cos.shape[1]} must be in (0, head_dim {q.shape[2]}]")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"q and k must share one floating dtype, got {q.dtype} and {k.dtype}")


def rotary_embedding_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, *, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel: rotates q (N, H, D) and k (N, H_kv, D) in place by the angles of
    positions (N,) and returns them. cos, sin: (max_position, D_rot / 2). q and k may be strided
    views (e.g. slices of one fused qkv tensor) but each head's D values must be contiguous."""
    _check(q, k, positions, cos, sin)
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        raise ValueError("q, k, cos and sin must be contiguous along their last dimension "
                         "(and cos, sin laid out alike)")
    if q.shape[0] == 0:
        return q, k
    half = cos.shape[1]
    block_half = triton.next_power_of_2(half)
    # a tile of heads per loop step keeps one program's registers in bounds at any head count
    block_h = max(1, min(triton.next_power_of_2(max(q.shape[1], k.shape[1])), _TILE_ELEMENTS // block_half))
    _rotary_embedding_kernel[(q.shape[0],)](
        q, k, positions, cos, sin, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        INTERLEAVED=interleaved, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half)
    return q, k


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> None:
    """x (N, H, D) rotated in place; cos, sin (N, 1, D_rot / 2) fp32."""
    half = cos.shape[-1]
    rot = x[..., :2 * half]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    a32, b32 = a.float(), b.float()
    new_a, new_b = a32 * cos - b32 * sin, b32 * cos + a32 * sin
    a.copy_(new_a)
    b.copy_(new_b)


def rotary_embedding_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, *, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same signature and numerics as rotary_embedding_triton (in place, fp32 math)."""
    _check(q, k, positions, cos, sin)
    cos_t = cos[positions].float().unsqueeze(1)  # (N, 1, D_rot / 2)
    sin_t = sin[positions].float().unsqueeze(1)
    _rotate_reference(q, cos_t, sin_t, interleaved)
    _rotate_reference(k, cos_t, sin_t, interleaved)
    return q, k


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (see the module docstring): the Triton kernel on CUDA tensors, the
    torch reference elsewhere."""
    if q.is_cuda:
        return rotary_embedding_triton(q, k, positions, cos, sin, interleaved=interleaved)
    return rotary_embedding_reference(q, k, positions, cos, sin, interleaved=interleaved)

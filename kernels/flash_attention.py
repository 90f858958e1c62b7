"""Attention forward for prefill, in Triton: FlashAttention-2 (Dao 2023).

One program owns BLOCK_M queries of one (batch, head) and walks the keys in BLOCK_N tiles,
keeping a running max m_i, running sum l_i and an fp32 accumulator (the online softmax), so the
T x S score matrix never exists. Queries are the last T of the S key positions (bottom-right
aligned, as flash-attn >= 2.1 does: query i sits at position S - T + i), which makes the same
kernel serve a fresh prompt (T == S) and a prefill chunk over cached context (T < S).

Variants are tl.constexpr flags of the one kernel body: CAUSAL (key j visible iff j <= pos(i)),
HAS_WINDOW (also j > pos(i) - window, the query's own key included: tandem's SlidingWindow rule),
HAS_ALIBI (adds slopes[h] * (j - pos(i)) to the scaled score: tandem's ALiBi). Key tiles no query
of the block can see are never loaded (loop bounds), and only the tiles on a mask's edge pay for
the mask: each program runs three loops, [edge of the window) [every row sees every key)
[diagonal and end of the keys). GQA/MQA: query head h reads KV head h // (H // H_kv).
Rows that see no key at all (T > S with causal) come out as 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import (LOG2E, check_dtypes, check_head_dim, check_heads, check_inner_stride,
                                   check_options, dot, is_interpreting, kernel_flags)


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# On the GPU: the tile shape of Triton's fused-attention tutorial for Hopper, for 2-byte inputs
# with D <= 128. Smaller tiles for fp32 or D > 128 so the pipelined Q, K and V tiles fit in shared
# memory (compiled for sm_90 without a GPU: fp32 at D = 128 with the large tiles needs 224.5 KiB,
# at H100's limit; 2-byte inputs 48 KiB). Not yet measured on tandem's shapes (the H100 benchmark
# is #5 part 2), so not yet autotuned either.
_GPU_CONFIG = _Config(block_m=128, block_n=64, num_warps=8, num_stages=3)
_GPU_CONFIG_SMALL_TILES = _Config(block_m=64, block_n=32, num_warps=4, num_stages=2)
# Under the interpreter every program runs in numpy, one after another: small tiles keep the
# tests short and make their small shapes span several query and key tiles.
_INTERPRETER_CONFIG = _Config(block_m=16, block_n=16, num_warps=1, num_stages=1)


def _config(head_dim: int, dtype: torch.dtype) -> _Config:
    if is_interpreting():
        return _INTERPRETER_CONFIG
    return _GPU_CONFIG if head_dim <= 128 and dtype.itemsize == 2 else _GPU_CONFIG_SMALL_TILES


@triton.jit
def _attend_key_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                      q_pos, offs_n, offs_d, key_start, key_end, num_keys, window, slope, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """Online softmax over the key tiles starting in [key_start, key_end). Scores are in log2
    units (qk_scale and slope include log2(e)). MASKED=False: every row sees every key there."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_k = start_n + offs_n  # (BLOCK_N,)
        key_ok = offs_k < num_keys
        k = tl.load(k_ptr + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = dot(q, k, INPUT_PRECISION, UPCAST_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        distance = offs_k[None, :] - q_pos[:, None]  # key position - query position
        if HAS_ALIBI:
            s += slope * distance.to(tl.float32)
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (distance <= 0)
            if HAS_WINDOW:
                visible = visible & (distance > -window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, num_queries, num_keys, window, qk_scale,
        GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
        HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    kv_head = (head // GROUP_SIZE).to(tl.int64)
    head = head.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + (num_keys - num_queries)  # (BLOCK_M,) positions among the keys
    row_ok = offs_m < num_queries
    d_ok = offs_d < HEAD_DIM
    q_ptr += batch * stride_qb + head * stride_qh
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_ptr += batch * stride_kb + kv_head * stride_kh
    v_ptr += batch * stride_vb + kv_head * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + head) * LOG2E  # in log2 units, like the scores

    # Keys some row of this block may see: [lo, hi). Keys every row sees: [full_lo, full_hi).
    first_pos = start_m * BLOCK_M + num_keys - num_queries
    last_pos = first_pos + BLOCK_M - 1
    lo = 0
    hi = num_keys
    full_lo = 0
    full_hi = num_keys
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
        full_hi = tl.minimum(full_hi, first_pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
        full_lo = tl.cdiv(tl.maximum(lo, last_pos - window + 1), BLOCK_N) * BLOCK_N
    lo = lo // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(full_hi // BLOCK_N * BLOCK_N, full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attend_key_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                                      q_pos, offs_n, offs_d, lo, full_lo, num_keys, window, slope, qk_scale,
                                      True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HEAD_DIM, BLOCK_N,
                                      INPUT_PRECISION, UPCAST_BF16)
    acc, l_i, m_i = _attend_key_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                                      q_pos, offs_n, offs_d, full_lo, full_hi, num_keys, window, slope, qk_scale,
                                      False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HEAD_DIM, BLOCK_N,
                                      INPUT_PRECISION, UPCAST_BF16)
    acc, l_i, m_i = _attend_key_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
                                      q_pos, offs_n, offs_d, full_hi, hi, num_keys, window, slope, qk_scale,
                                      True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HEAD_DIM, BLOCK_N,
                                      INPUT_PRECISION, UPCAST_BF16)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: acc is 0, so 0
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, alibi_slopes, scale) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, H_kv, S, D), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim")
    check_heads(q.shape[1], k.shape[1])
    check_dtypes(q=q, k=k, v=v)
    check_head_dim(q.shape[3])
    check_options(q.shape[1], q.device, window, alibi_slopes, scale)


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                           window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, H_kv, S, D) -> (B, H, T, D) in q's dtype, with the Triton
    kernel (any strides with a contiguous last dimension)."""
    _check(q, k, v, window, alibi_slopes, scale)
    check_inner_stride(q=q, k=k, v=v)
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    scale = head_dim ** -0.5 if scale is None else scale
    config = _config(head_dim, q.dtype)
    grid = (triton.cdiv(num_queries, config.block_m), batch * num_heads)
    _flash_attention_kernel[grid](
        q, k, v, out, q if alibi_slopes is None else alibi_slopes,  # q: never read without ALiBi
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, num_queries, num_keys, window or 0, scale * LOG2E.value,
        GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim, CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_ALIBI=alibi_slopes is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=config.num_warps, num_stages=config.num_stages,
        **kernel_flags(q.dtype))
    return out


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                              window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                              scale: float | None = None) -> torch.Tensor:
    """The same computation in plain torch: fp32 scores with KV heads repeated, an explicit mask
    and bias, softmax, cast back. Rows with no visible key give 0, as the kernel does."""
    _check(q, k, v, window, alibi_slopes, scale)
    num_heads, num_queries, head_dim = q.shape[1:]
    num_keys = k.shape[2]
    group = num_heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    keys = k.float().repeat_interleave(group, dim=1)  # (B, H, S, D)
    values = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ keys.transpose(-1, -2) * scale  # (B, H, T, S)
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=q.device)
    distance = torch.arange(num_keys, device=q.device).unsqueeze(0) - q_pos.unsqueeze(1)  # (T, S)
    visible = torch.ones_like(distance, dtype=torch.bool)
    if causal:
        visible &= distance <= 0
    if window is not None:
        visible &= distance > -window
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.view(1, num_heads, 1, 1) * distance
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return (probs @ values).to(q.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, S, D): the Triton kernel for CUDA
    tensors, the torch reference otherwise."""
    impl = flash_attention_triton if q.is_cuda else flash_attention_reference
    return impl(q, k, v, causal=causal, window=window, alibi_slopes=alibi_slopes, scale=scale)

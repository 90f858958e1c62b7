"""Decode attention over a paged KV cache, in Triton: PagedAttention (Kwon et al. 2023) with
Flash-Decoding's split-K (Dao, Haziza, Massa, Sizov 2023) for long contexts.

Each sequence has one query (at position context_lens[b] - 1). Its keys live in the pool
k_cache/v_cache (num_blocks, block_size, H_kv, D), tandem's DenseKVPool layout: key t of
sequence b is slot t % block_size of block block_tables[b, t // block_size].

One program owns one (sequence, KV head) and all GROUP_SIZE = H // H_kv query heads that read it,
so each K/V tile is loaded once per group (GQA's bandwidth saving); the group is padded to
BLOCK_G >= 16 rows for tl.dot. It walks the context in BLOCK_N-key tiles with the online softmax
(FlashAttention-2's running max and sum). The page of every key is looked up, so block_size need
not divide or equal the tile (any block size works, including a whole contiguous cache as one
block). With a window, tiles before it are never loaded.

Split-K (SPLIT, a tl.constexpr flag of the same kernel): when B * H_kv programs are too few to
fill the GPU, the context is cut into num_splits ranges of whole tiles, one program each; each
writes its partial (m, l, acc) to fp32 scratch and `_combine_splits_kernel` merges them:
out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, m = max_s m_s.
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
    block_n: int
    num_warps: int
    num_stages: int


# On the GPU: 64-key tiles, as vLLM's and SGLang's Triton decode kernels use. Not yet measured on
# tandem's shapes (the H100 benchmark is #5 part 2).
_GPU_CONFIG = _Config(block_n=64, num_warps=4, num_stages=2)
_INTERPRETER_CONFIG = _Config(block_n=16, num_warps=1, num_stages=1)
# Split only when a split still gets this many keys: below it the combine step costs more than
# the extra parallelism brings (Flash-Decoding's regime is long contexts). Unmeasured.
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 16


def _config() -> _Config:
    return _INTERPRETER_CONFIG if is_interpreting() else _GPU_CONFIG


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs to cover every SM once, without a split
    shorter than _MIN_KEYS_PER_SPLIT. max_context is an upper bound (from the block table's width,
    so no GPU->CPU sync). Off CUDA (the interpreter): 1."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * num_kv_heads
    if programs >= num_sms:
        return 1
    return max(1, min(triton.cdiv(num_sms, programs), max_context // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


@triton.jit
def _paged_attention_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, slopes_ptr,
        out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        stride_qb, stride_qh, stride_qd,
        stride_kblk, stride_kslot, stride_kh, stride_kd,
        stride_vblk, stride_vslot, stride_vh, stride_vd,
        stride_tb, stride_tblk,
        stride_ob, stride_oh, stride_od,
        stride_pb, stride_ph, stride_ps,
        stride_ab, stride_ah, stride_as, stride_ad,
        block_size, num_splits, window, qk_scale,
        GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP_SIZE + offs_g  # (BLOCK_G,) the query heads of this KV head
    head_ok = offs_g < GROUP_SIZE
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=head_ok, other=0.0) * LOG2E  # log2 units
    k_cache_ptr += kv_head * stride_kh
    v_cache_ptr += kv_head * stride_vh
    table_ptr = block_tables_ptr + batch * stride_tb

    context_len = tl.load(context_lens_ptr + batch)
    query_pos = context_len - 1
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(context_len - window, 0)
    first = first // BLOCK_N * BLOCK_N
    # This program's share of [first, context_len): whole tiles, the same count for every split.
    tiles_per_split = tl.cdiv(tl.cdiv(context_len - first, BLOCK_N), num_splits)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_k = start_n + offs_n  # (BLOCK_N,) key positions
        in_context = offs_k < context_len
        visible = in_context
        if HAS_WINDOW:
            visible = visible & (offs_k > query_pos - window)
        page = tl.load(table_ptr + (offs_k // block_size) * stride_tblk, mask=in_context, other=0).to(tl.int64)
        slot = offs_k % block_size
        k_offs = page[None, :] * stride_kblk + slot[None, :] * stride_kslot + offs_d[:, None] * stride_kd
        k = tl.load(k_cache_ptr + k_offs, mask=visible[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = dot(q, k, INPUT_PRECISION, UPCAST_BF16) * qk_scale  # (BLOCK_G, BLOCK_N), log2 units
        if HAS_ALIBI:
            s += slopes[:, None] * (offs_k - query_pos).to(tl.float32)[None, :]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: 0, not NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_offs = page[:, None] * stride_vblk + slot[:, None] * stride_vslot + offs_d[None, :] * stride_vd
        v = tl.load(v_cache_ptr + v_offs, mask=visible[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST_BF16)
        m_i = m_new

    if SPLIT:  # partial results, unnormalized; empty splits write m = -inf, l = 0, acc = 0
        part = batch * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_m_ptr + part, m_i, mask=head_ok)
        tl.store(part_l_ptr + part, l_i, mask=head_ok)
        tl.store(part_acc_ptr + batch * stride_ab + heads[:, None] * stride_ah + split * stride_as
                 + offs_d[None, :] * stride_ad, acc, mask=head_ok[:, None] & d_ok[None, :])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
                           stride_pb, stride_ph, stride_ps,
                           stride_ab, stride_ah, stride_as, stride_ad,
                           stride_ob, stride_oh, stride_od, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (sequence, query head): merge the splits' partial softmaxes."""
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    part = batch * stride_pb + head * stride_ph + offs_s * stride_ps
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))  # (BLOCK_S,)
    l = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + batch * stride_ab + head * stride_ah + offs_s[:, None] * stride_as
                  + offs_d[None, :] * stride_ad, mask=split_ok[:, None] & d_ok[None, :], other=0.0)  # (S, D)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: 0
    total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(q, k_cache, v_cache, block_tables, context_lens, window, alibi_slopes, scale, num_splits) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be (B, H, D) and k_cache, v_cache (num_blocks, block_size, H_kv, D), "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)}")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} != q head dim {q.shape[2]}")
    batch = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 (B={batch}, max_blocks), "
                         f"got {block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32 (B={batch},), "
                         f"got {context_lens.dtype} {tuple(context_lens.shape)}")
    if block_tables.device != q.device or context_lens.device != q.device:
        raise ValueError(f"block_tables and context_lens must be on q's device {q.device}")
    check_heads(q.shape[1], k_cache.shape[2])
    check_dtypes(q=q, k_cache=k_cache, v_cache=v_cache)
    check_head_dim(q.shape[2])
    check_options(q.shape[1], q.device, window, alibi_slopes, scale)
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an integer >= 1, got {num_splits!r}")


def paged_attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                                  scale: float | None = None, window: int | None = None,
                                  alibi_slopes: torch.Tensor | None = None,
                                  num_splits: int | None = None) -> torch.Tensor:
    """q (B, H, D) over the paged cache -> (B, H, D) in q's dtype, with the Triton kernels.
    Block-table entries past a sequence's context are never read. num_splits: context ranges per
    (sequence, KV head); 1 is the single pass, None chooses (`choose_num_splits`)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, window, alibi_slopes, scale, num_splits)
    check_inner_stride(q=q, k_cache=k_cache, v_cache=v_cache)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    config = _config()
    scale = head_dim ** -0.5 if scale is None else scale
    group_size = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    split = num_splits > 1
    if split:  # fp32 scratch: (B, H, splits) running max and sum, (B, H, splits, D) accumulator
        part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:  # never touched: SPLIT is off
        part_m = part_l = part_acc = out.new_empty(1, 1, 1, 1, dtype=torch.float32)
    _paged_attention_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, q if alibi_slopes is None else alibi_slopes,
        out, part_m, part_l, part_acc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *part_m.stride()[:3], *part_acc.stride(),
        block_size, num_splits, window or 0, scale * LOG2E.value,
        GROUP_SIZE=group_size, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        BLOCK_N=config.block_n, BLOCK_D=block_d, SPLIT=split, HAS_WINDOW=window is not None,
        HAS_ALIBI=alibi_slopes is not None, num_warps=config.num_warps, num_stages=config.num_stages,
        **kernel_flags(q.dtype))
    if split:
        _combine_splits_kernel[(batch, num_heads)](
            part_m, part_l, part_acc, out, *part_m.stride(), *part_acc.stride(), *out.stride(), num_splits,
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=config.num_warps)
    return out


def paged_attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                                     scale: float | None = None, window: int | None = None,
                                     alibi_slopes: torch.Tensor | None = None,
                                     num_splits: int | None = None) -> torch.Tensor:
    """The same in plain torch: gather each sequence's keys through its block table, fp32 scores
    with KV heads repeated, explicit mask and bias, softmax. num_splits is checked and otherwise
    ignored (how the kernel divides the work does not change the result)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, window, alibi_slopes, scale, num_splits)
    num_heads, head_dim = q.shape[1:]
    block_size = k_cache.shape[1]
    group = num_heads // k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    positions = torch.arange(block_tables.shape[1] * block_size, device=q.device)  # (S,)
    lengths = context_lens.long().unsqueeze(1)  # (B, 1)
    in_context = positions < lengths  # (B, S)
    blocks = block_tables.long()[:, positions // block_size].masked_fill(~in_context, 0)  # padding: never used
    keys = k_cache[blocks, positions % block_size].float().repeat_interleave(group, dim=2)  # (B, S, H, D)
    values = v_cache[blocks, positions % block_size].float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), keys) * scale  # (B, H, S)
    distance = positions - (lengths - 1)  # (B, S): key position - query position
    visible = in_context if window is None else in_context & (distance > -window)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.view(1, num_heads, 1) * distance.unsqueeze(1)
    probs = scores.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bshd->bhd", probs, values).to(q.dtype)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                           scale: float | None = None, window: int | None = None,
                           alibi_slopes: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One decode query per sequence over the paged cache: the Triton kernels for CUDA tensors,
    the torch reference otherwise."""
    impl = paged_attention_decode_triton if q.is_cuda else paged_attention_decode_reference
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale=scale, window=window,
                alibi_slopes=alibi_slopes, num_splits=num_splits)

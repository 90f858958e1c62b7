"""Attention over a paged KV cache on the CPU (PagedAttention's layout, torch ops).

The pool is one tensor per layer of shape (num_blocks * block_size, H_kv, D): a token's slot is
block_id * block_size + offset. Each step, new keys/values are scattered to their slots; then
decode tokens (one query each) attend together in one SDPA call over their gathered, padded
contexts, and each prefill chunk attends over its own context. On CUDA the Triton paged kernel
takes this place (kernels issue).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.model.attention import attend_one_sequence


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of this chunk in the flat batch
    num_tokens: int
    num_cached: int  # context tokens before the chunk
    context_slots: torch.Tensor | None  # (num_cached + num_tokens,) slots; None when num_cached == 0


@dataclass(frozen=True)
class DecodeBatch:
    rows: torch.Tensor  # (B,) rows of the flat batch holding one decode query each
    context_slots: torch.Tensor  # (B, S_max) slots of each context, padded
    mask: torch.Tensor  # (B, 1, 1, S_max) True where the slot is part of the context


@dataclass(frozen=True)
class PagedAttentionMetadata:
    slots: torch.Tensor  # (N,) where the new tokens' K/V go
    prefills: tuple[PrefillChunk, ...]
    decodes: DecodeBatch | None


class PagedAttention:
    """The AttentionContext of one engine step."""

    def __init__(self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], meta: PagedAttentionMetadata):
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.k_cache[layer], self.v_cache[layer]
        k_pool[self.meta.slots] = k.to(k_pool.dtype)
        v_pool[self.meta.slots] = v.to(v_pool.dtype)
        if self.meta.decodes is None and len(self.meta.prefills) == 1 and self.meta.prefills[0].num_cached == 0:
            return attend_one_sequence(q, k, v, 0)  # the whole batch is one fresh prompt
        out = torch.empty_like(q)
        for chunk in self.meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.context_slots is None:
                out[rows] = attend_one_sequence(q[rows], k[rows], v[rows], 0)
            else:
                keys, values = k_pool[chunk.context_slots], v_pool[chunk.context_slots]
                out[rows] = attend_one_sequence(q[rows], keys.to(q.dtype), values.to(q.dtype), chunk.num_cached)
        if self.meta.decodes is not None:
            d = self.meta.decodes
            keys = k_pool[d.context_slots].to(q.dtype).transpose(1, 2)  # (B, Hkv, S_max, D)
            values = v_pool[d.context_slots].to(q.dtype).transpose(1, 2)
            queries = q[d.rows].unsqueeze(2)  # (B, H, 1, D)
            result = F.scaled_dot_product_attention(queries, keys, values, attn_mask=d.mask, enable_gqa=True)
            out[d.rows] = result.squeeze(2)
        return out


def build_metadata(rows: list[tuple[list[int], int, int]], block_size: int) -> PagedAttentionMetadata:
    """rows: per scheduled sequence, (block_table, num_computed_tokens, num_new_tokens), in flat order."""
    slots, prefills, decode_rows, decode_tables, decode_lens = [], [], [], [], []
    start = 0
    for table, num_cached, num_new in rows:
        table_t = torch.tensor(table, dtype=torch.long)
        context_len = num_cached + num_new
        positions = torch.arange(num_cached, context_len)
        slots.append(table_t[positions // block_size] * block_size + positions % block_size)
        if num_new == 1 and num_cached > 0:
            decode_rows.append(start)
            decode_tables.append(table_t)
            decode_lens.append(context_len)
        else:
            context = None
            if num_cached:
                all_positions = torch.arange(context_len)
                context = table_t[all_positions // block_size] * block_size + all_positions % block_size
            prefills.append(PrefillChunk(start, num_new, num_cached, context))
        start += num_new
    return PagedAttentionMetadata(torch.cat(slots), tuple(prefills),
                                  _decode_batch(decode_rows, decode_tables, decode_lens, block_size))


def _decode_batch(rows: list[int], tables: list[torch.Tensor], lens: list[int], block_size: int) -> DecodeBatch | None:
    if not rows:
        return None
    max_len = max(lens)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(rows), max_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        n = min(len(t), max_blocks)
        table[i, :n] = t[:n]
    positions = torch.arange(max_len)
    slots = table[:, positions // block_size] * block_size + positions % block_size  # (B, S_max)
    mask = positions.unsqueeze(0) < torch.tensor(lens).unsqueeze(1)  # (B, S_max)
    return DecodeBatch(torch.tensor(rows), slots, mask[:, None, None, :])

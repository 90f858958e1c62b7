"""Attention over a paged KV cache on the CPU (PagedAttention's layout, torch ops).

The pool is one tensor per layer of shape (num_blocks, block_size, H_kv, D): a token's slot is
block_id * block_size + offset. Each step, new keys/values are scattered to their slots; then
decode tokens (one query each) attend together over their contexts, gathered whole blocks at a
time (contiguous 16-token rows copy far faster than token-sized ones), and each prefill chunk
attends over its own context. On CUDA the Triton paged kernel takes this place (kernels issue).
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
    context_blocks: torch.Tensor | None  # (ceil(context / block_size),) block ids; None when num_cached == 0


@dataclass(frozen=True)
class DecodeBatch:
    rows: torch.Tensor  # (B,) rows of the flat batch holding one decode query each
    block_tables: torch.Tensor  # (B, max_blocks) block ids, padded with block 0
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
        k_pool, v_pool = self.k_cache[layer], self.v_cache[layer]  # (num_blocks, block_size, Hkv, D)
        k_pool.view(-1, *k_pool.shape[2:])[self.meta.slots] = k.to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[self.meta.slots] = v.to(v_pool.dtype)
        if self.meta.decodes is None and len(self.meta.prefills) == 1 and self.meta.prefills[0].num_cached == 0:
            return attend_one_sequence(q, k, v, 0)  # the whole batch is one fresh prompt
        out = torch.empty_like(q)
        for chunk in self.meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            if chunk.context_blocks is None:
                out[rows] = attend_one_sequence(q[rows], k[rows], v[rows], 0)
            else:
                length = chunk.num_cached + chunk.num_tokens
                keys = k_pool[chunk.context_blocks].flatten(0, 1)[:length].to(q.dtype)  # (S, Hkv, D)
                values = v_pool[chunk.context_blocks].flatten(0, 1)[:length].to(q.dtype)
                out[rows] = attend_one_sequence(q[rows], keys, values, chunk.num_cached)
        if self.meta.decodes is not None:
            d = self.meta.decodes
            out[d.rows] = decode_attention(q[d.rows], k_pool[d.block_tables].flatten(1, 2).to(q.dtype),
                                           v_pool[d.block_tables].flatten(1, 2).to(q.dtype), d.mask)
        return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q (B, H, D) over keys/values (B, S, Hkv, D) where mask (B, 1, 1, S).
    Plain batched matmuls with the query heads grouped per KV head: for a single query row this
    is several times faster on the CPU than SDPA with a mask (measured: 2.5 ms -> 0.2 ms a layer)."""
    batch, num_heads, dim = q.shape
    num_kv = keys.shape[2]
    grouped = q.view(batch, num_kv, num_heads // num_kv, dim)  # (B, Hkv, G, D)
    scores = grouped @ keys.permute(0, 2, 3, 1) * dim ** -0.5  # (B, Hkv, G, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ values.transpose(1, 2)).reshape(batch, num_heads, dim)


def build_metadata(rows: list[tuple[list[int], int, int]], block_size: int) -> PagedAttentionMetadata:
    """rows: per scheduled sequence, (block_table, num_computed_tokens, num_new_tokens), in flat order."""
    slots, prefills, decode_rows, decode_tables, decode_lens = [], [], [], [], []
    start = 0
    for table, num_cached, num_new in rows:
        context_len = num_cached + num_new
        table_t = torch.tensor(table[:-(-context_len // block_size)], dtype=torch.long)
        positions = torch.arange(num_cached, context_len)
        slots.append(table_t[positions // block_size] * block_size + positions % block_size)
        if num_new == 1 and num_cached > 0:
            decode_rows.append(start)
            decode_tables.append(table_t)
            decode_lens.append(context_len)
        else:
            prefills.append(PrefillChunk(start, num_new, num_cached, table_t if num_cached else None))
        start += num_new
    return PagedAttentionMetadata(torch.cat(slots), tuple(prefills),
                                  _decode_batch(decode_rows, decode_tables, decode_lens, block_size))


def _decode_batch(rows: list[int], tables: list[torch.Tensor], lens: list[int], block_size: int) -> DecodeBatch | None:
    if not rows:
        return None
    max_blocks = max(len(t) for t in tables)
    table = torch.zeros(len(rows), max_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, :len(t)] = t
    positions = torch.arange(max_blocks * block_size)
    mask = positions.unsqueeze(0) < torch.tensor(lens).unsqueeze(1)  # (B, S_max)
    return DecodeBatch(torch.tensor(rows), table, mask[:, None, None, :])

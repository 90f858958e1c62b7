"""Attention over a paged KV cache (PagedAttention's layout, Kwon et al. 2023).

Each layer has a K pool and a V pool of (num_blocks, block_size, H_kv, D) (a `KVPool`; its format
may be quantized). Each step, new keys/values are scattered to their slots; then decode tokens
(one query each) attend together over their contexts through the backend's `paged_decode`, and
each prefill chunk attends over its own context through `prefill`. Block tables may have holes
(NULL_BLOCK) where a windowed variant released blocks nobody can see any more: only live blocks
are gathered, with their true positions, so the variant's mask stays exact.

With a variant that evicts by received attention (H2O), every sequence of the step, decode or
prefill, attends alone over its live keys through the backend's `scored`, and the context sums
what each sequence's query blocks gave its key blocks over the layers (`received`): the model
runner hands that to the engine. Alone, so a sequence's scores never depend on the batch.

Masks depend on positions only, so they are built once per step here, not once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.block_manager import NULL_BLOCK
from tandem.errors import PluginError
from tandem.kernels.cpu import ops as cpu_ops
from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant, fresh_causal_mask, tensors_to


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of this chunk in the flat batch
    num_tokens: int
    num_cached: int  # context tokens before the chunk
    context_blocks: torch.Tensor | None  # live block ids holding the context; None when num_cached == 0
    num_context_keys: int  # keys in those blocks that belong to the context (the last block may be part-full)
    mask: AttentionMask
    # Scored steps only (an evicting variant): each query's block and each key's block, relative
    # to the chunk's first query block and the table's start: (T,), (S,) int64.
    query_blocks: torch.Tensor | None = None
    key_blocks: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeBatch:
    rows: torch.Tensor  # (B,) rows of the flat batch holding one decode query each
    block_tables: torch.Tensor  # (B, max_blocks) live block ids, padded with block 0
    mask: AttentionMask  # allowed (B, 1, S), bias (B, H, 1, S); S = max_blocks * block_size
    # One sequence whose blocks are consecutive (the common single-user case): (first block, context
    # length). Its keys are then a view of the pool, read without a gather; mask is over exactly them.
    contiguous: tuple[int, int] | None = None


@dataclass(frozen=True)
class FlatRows:
    """Every row of the flat batch as a key range, for kernels that take the whole step at once
    (tandem's CPU paged attention): row n sees the keys at positions [first[n], end[n]) of block
    table row_table[n]. Built when the variant is a key window (AttentionVariant.key_window)."""

    tables: torch.Tensor  # (R, max_blocks) int64, one per scheduled sequence, padded with NULL_BLOCK
    row_table: torch.Tensor  # (N,) int64
    first: torch.Tensor  # (N,) int64
    end: torch.Tensor  # (N,) int64: the row's own position + 1

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.tables, self.row_table, self.first, self.end


@dataclass(frozen=True)
class PagedAttentionMetadata:
    slots: torch.Tensor  # (N,) where the new tokens' K/V go
    prefills: tuple[PrefillChunk, ...]
    decodes: DecodeBatch | None
    rows: FlatRows | None = None
    scored: bool = False  # every sequence is a chunk with query_blocks/key_blocks: attention is scored

    def to(self, device: torch.device) -> PagedAttentionMetadata:
        """The same metadata with every tensor on `device` (built on the host, used where the model is)."""
        return tensors_to(self, device)


class PagedAttention:
    """The AttentionContext of one engine step."""

    def __init__(self, k_pools: list, v_pools: list, meta: PagedAttentionMetadata,
                 variant: AttentionVariant, backend: AttentionBackend):
        self.k_pools, self.v_pools, self.meta = k_pools, v_pools, meta
        self.variant, self.backend = variant, backend
        self._some_pool = next(p for p in k_pools if p is not None)  # a pipeline stage has some layers' pools
        # Scored steps: per chunk, (query blocks, key blocks) fp32, the attention the chunk's
        # query blocks gave each key block of its table, summed over heads, queries and layers.
        self.received = [torch.zeros(int(c.query_blocks[-1]) + 1, int(c.key_blocks[-1]) + 1, device=c.mask.allowed.device)
                         for c in meta.prefills] if meta.scored else None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_pool, v_pool = self.k_pools[layer], self.v_pools[layer]
        k_pool.write(self.meta.slots, k)
        v_pool.write(self.meta.slots, v)
        rows = self.flat_rows(q.dtype, q.device)
        if rows is not None:  # one call for the whole step, prefill and decode rows alike
            return cpu_ops().paged_attention(q, k_pool.data, v_pool.data, *rows.args())
        try:
            if self.received is not None:
                return self._attend_scored(k_pool, v_pool, q, k, v)
            return self._attend(k_pool, v_pool, q, k, v)
        except Exception as exc:
            raise PluginError(f"attention backend {self.backend.name!r} with variant {self.variant.name!r} "
                              f"failed: {type(exc).__name__}: {exc}") from exc

    def flat_rows(self, dtype: torch.dtype, device: torch.device) -> FlatRows | None:
        """The step as key ranges when the backend computes it in one call over the pools
        (AttentionBackend.reads_pool_in_place; the model may then run its fused layer), else None."""
        rows = self.meta.rows
        if rows is None or not self.backend.reads_pool_in_place(dtype, device, self._some_pool, self.variant):
            return None
        return rows

    def _attend(self, k_pool, v_pool, q, k, v) -> torch.Tensor:
        meta = self.meta
        if meta.decodes is None and len(meta.prefills) == 1 and meta.prefills[0].num_cached == 0:
            return self.backend.prefill(q, k, v, meta.prefills[0].mask)  # the whole batch is one fresh prompt
        if not meta.prefills:  # the whole batch is decodes, in row order
            return self._decode(meta.decodes, k_pool, v_pool, q)
        out = torch.empty_like(q)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            keys, values = self._chunk_keys(chunk, k_pool, v_pool, k[rows], v[rows], q.dtype)  # (S, Hkv, D)
            out[rows] = self.backend.prefill(q[rows], keys, values, chunk.mask)
        if meta.decodes is not None:
            out[meta.decodes.rows] = self._decode(meta.decodes, k_pool, v_pool, q[meta.decodes.rows])
        return out

    def _attend_scored(self, k_pool, v_pool, q, k, v) -> torch.Tensor:
        out = torch.empty_like(q)
        for chunk, received in zip(self.meta.prefills, self.received):
            rows = slice(chunk.start, chunk.start + chunk.num_tokens)
            keys, values = self._chunk_keys(chunk, k_pool, v_pool, k[rows], v[rows], q.dtype)
            out[rows], probs = self.backend.scored(q[rows], keys, values, chunk.mask)  # probs (T, S)
            received.index_put_((chunk.query_blocks.unsqueeze(1), chunk.key_blocks.unsqueeze(0)), probs, accumulate=True)
        return out

    @staticmethod
    def _chunk_keys(chunk: PrefillChunk, k_pool, v_pool, k, v, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's keys and values (S, Hkv, D): its own for a fresh prompt, else its live context."""
        if chunk.context_blocks is None:
            return k, v
        n = chunk.num_context_keys
        return (k_pool.gather(chunk.context_blocks).flatten(0, 1)[:n].to(dtype),
                v_pool.gather(chunk.context_blocks).flatten(0, 1)[:n].to(dtype))

    def _decode(self, d: DecodeBatch, k_pool, v_pool, q: torch.Tensor) -> torch.Tensor:
        if d.contiguous is not None:
            first, length = d.contiguous
            keys = k_pool.gather_range(first, length).unsqueeze(0).to(q.dtype)  # (1, S, Hkv, D)
            values = v_pool.gather_range(first, length).unsqueeze(0).to(q.dtype)
            return self.backend.decode(q, keys, values, d.mask)
        return self.backend.paged_decode(q, k_pool, v_pool, d.block_tables, d.mask)


def _live_blocks(table: list[int], num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids, first position of each) of the live blocks covering num_tokens tokens."""
    table_t = torch.tensor(table[:-(-num_tokens // block_size)], dtype=torch.long)
    starts = torch.arange(len(table_t)) * block_size
    if NULL_BLOCK in table:
        live = table_t != NULL_BLOCK
        table_t, starts = table_t[live], starts[live]
    return table_t, starts


def build_metadata(rows: list[tuple[list[int], int, int]], block_size: int, variant: AttentionVariant,
                   num_heads: int, flat_only: bool = False, scored: bool = False) -> PagedAttentionMetadata:
    """rows: per scheduled sequence, (block_table, num_computed_tokens, num_new_tokens), in flat order.
    flat_only: the backend computes every step from key ranges (reads_pool_in_place): build
    only the slots and FlatRows, in plain Python (no masks, no per-sequence tensors).
    scored: every sequence is a chunk of its own, with an explicit mask and each query's and
    key's block (the variant evicts by received attention)."""
    if flat_only:
        return _flat_metadata(rows, block_size, variant)
    if scored:
        return _scored_metadata(rows, block_size, variant, num_heads)
    slots, prefills, decodes = [], [], []
    start = 0
    offsets = torch.arange(block_size)
    for table, num_cached, num_new in rows:
        context_len = num_cached + num_new
        positions = torch.arange(num_cached, context_len)
        table_new = torch.tensor(table[num_cached // block_size:-(-context_len // block_size)], dtype=torch.long)
        slots.append(table_new[positions // block_size - num_cached // block_size] * block_size
                     + positions % block_size)
        if num_new == 1 and num_cached > 0:
            decodes.append((start, *_live_blocks(table, context_len, block_size), context_len))
        elif num_cached == 0:
            prefills.append(PrefillChunk(start, num_new, 0, None, 0, fresh_causal_mask(variant, num_new, num_heads)))
        else:
            blocks, starts = _live_blocks(table, context_len, block_size)
            key_pos = (starts.unsqueeze(1) + offsets).flatten()
            key_pos = key_pos[key_pos < context_len]
            mask = AttentionMask.build(variant, positions, key_pos, num_heads)
            prefills.append(PrefillChunk(start, num_new, num_cached, blocks, len(key_pos), mask))
        start += num_new
    return PagedAttentionMetadata(torch.cat(slots), tuple(prefills),
                                  _decode_batch(decodes, block_size, variant, num_heads))


def _scored_metadata(rows: list[tuple[list[int], int, int]], block_size: int, variant: AttentionVariant,
                     num_heads: int) -> PagedAttentionMetadata:
    slots, chunks, start = [], [], 0
    offsets = torch.arange(block_size)
    for table, num_cached, num_new in rows:
        context_len = num_cached + num_new
        positions = torch.arange(num_cached, context_len)
        slots += [table[pos // block_size] * block_size + pos % block_size for pos in range(num_cached, context_len)]
        if num_cached == 0:
            blocks, key_pos = None, positions
        else:
            blocks, starts = _live_blocks(table, context_len, block_size)
            key_pos = (starts.unsqueeze(1) + offsets).flatten()
            key_pos = key_pos[key_pos < context_len]
        mask = AttentionMask.build(variant, positions, key_pos, num_heads)
        chunks.append(PrefillChunk(start, num_new, num_cached, blocks, len(key_pos), mask,
                                   positions // block_size - num_cached // block_size, key_pos // block_size))
        start += num_new
    return PagedAttentionMetadata(torch.tensor(slots, dtype=torch.long), tuple(chunks), None, scored=True)


def _flat_metadata(rows: list[tuple[list[int], int, int]], block_size: int,
                   variant: AttentionVariant) -> PagedAttentionMetadata:
    slots = []
    for table, num_cached, num_new in rows:
        slots += [table[pos // block_size] * block_size + pos % block_size
                  for pos in range(num_cached, num_cached + num_new)]
    flat = _flat_rows(rows, variant)
    if flat is None:
        raise ValueError(f"attention variant {variant.name!r} is not a key window: it needs the full metadata")
    return PagedAttentionMetadata(torch.tensor(slots, dtype=torch.long), (), None, flat)


def _flat_rows(rows: list[tuple[list[int], int, int]], variant: AttentionVariant) -> FlatRows | None:
    window = variant.key_window()
    if window is None:
        return None
    width = max(len(table) for table, _, _ in rows)
    tables = torch.tensor([table + [NULL_BLOCK] * (width - len(table)) for table, _, _ in rows], dtype=torch.long)
    row_table, ends = [], []
    for r, (_, num_cached, num_new) in enumerate(rows):
        row_table += [r] * num_new
        ends += range(num_cached + 1, num_cached + num_new + 1)
    end = torch.tensor(ends, dtype=torch.long)
    first = (end - window).clamp_(min=0) if window else torch.zeros_like(end)
    return FlatRows(tables, torch.tensor(row_table, dtype=torch.long), first, end)


def _decode_batch(decodes: list, block_size: int, variant: AttentionVariant, num_heads: int) -> DecodeBatch | None:
    if not decodes:
        return None
    rows = torch.tensor([row for row, *_ in decodes])
    lengths = torch.tensor([length for *_, length in decodes])
    query_pos = (lengths - 1).unsqueeze(1)  # (B, 1): each decode token is its sequence's last
    contiguous = _consecutive_run(decodes, block_size)
    if contiguous is not None:  # exactly the context's keys, in order: positions 0 .. length - 1
        mask = AttentionMask.build(variant, query_pos, torch.arange(contiguous[1]).unsqueeze(0), num_heads)
        return DecodeBatch(rows, decodes[0][1].unsqueeze(0), mask, contiguous)
    max_blocks = max(len(blocks) for _, blocks, _, _ in decodes)
    table = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
    starts = torch.full((len(decodes), max_blocks), -block_size, dtype=torch.long)  # padding: never valid
    for i, (_, blocks, block_starts, _) in enumerate(decodes):
        table[i, :len(blocks)] = blocks
        starts[i, :len(blocks)] = block_starts
    key_pos = (starts.unsqueeze(2) + torch.arange(block_size)).flatten(1)  # (B, S)
    valid = (key_pos >= 0) & (key_pos < lengths.unsqueeze(1))
    return DecodeBatch(rows, table, AttentionMask.build(variant, query_pos, key_pos, num_heads, valid))


def _consecutive_run(decodes: list, block_size: int) -> tuple[int, int] | None:
    """(first block, context length) when the batch is one sequence with no holes whose blocks
    are consecutive in the pool."""
    if len(decodes) != 1:
        return None
    _, blocks, starts, length = decodes[0]
    if len(blocks) != -(-length // block_size) or int(starts[0]) != 0:
        return None  # holes: some blocks were released
    first = int(blocks[0])
    if not torch.equal(blocks, torch.arange(first, first + len(blocks))):
        return None
    return first, length

"""The model runner: owns the KV pools, turns a scheduled step into one batched forward over a
flat mix of prefill chunks and decode tokens, and returns logits only where a token is to be
sampled (the LM head is the largest matmul of a small model: never run it on prompt rows).
"""
from __future__ import annotations

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.engine.paged_attention import PagedAttention, build_metadata
from tandem.engine.sequence import Sequence
from tandem.model.attention import AttentionBackend, AttentionVariant
from tandem.model.kv_pool import KVCacheFormat


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 kv_format: KVCacheFormat, variant: AttentionVariant, backend: AttentionBackend):
        self.model, self.config = model, config
        self.block_size, self.num_blocks = block_size, num_blocks
        self.variant, self.backend = variant, backend
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # One pool per layer for K and for V.
        self.k_pools = [kv_format.create_pool(*shape, dtype) for _ in range(config.num_layers)]
        self.v_pools = [kv_format.create_pool(*shape, dtype) for _ in range(config.num_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer before the forward writes to them."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies])
        dst = torch.tensor([d for _, d in copies])
        for pool in (*self.k_pools, *self.v_pools):
            pool.copy_blocks(src, dst)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]],
                sample_rows: list[int]) -> torch.Tensor:
        """Run one step. sample_rows: indices into `scheduled` whose last computed token is to be
        sampled from. Returns fp32 logits (len(sample_rows), vocab)."""
        self.copy_blocks(copies)
        tokens, positions, rows = [], [], []
        for seq, num in scheduled:
            start = seq.num_computed_tokens
            tokens += seq.token_ids[start:start + num]
            positions += range(start, start + num)
            rows.append((seq.block_table, start, num))
        meta = build_metadata(rows, self.block_size, self.variant, self.config.num_heads)
        attention = PagedAttention(self.k_pools, self.v_pools, meta, self.variant, self.backend)
        hidden = self.model(torch.tensor([tokens]), torch.tensor([positions]), attention)[0]  # (N, d)
        ends = torch.tensor([n for _, n in scheduled]).cumsum(0) - 1  # last row of each sequence
        return self.model.compute_logits(hidden[ends[sample_rows]])

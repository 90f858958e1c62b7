"""The model runner: owns the KV pools, turns a scheduled step into one batched forward over a
flat mix of prefill chunks and decode tokens, and returns logits only where a token is to be
sampled (the LM head is the largest matmul of a small model: never run it on prompt rows).
With a variant that evicts by attention (H2O), it also reports what each sequence's query blocks
gave its key blocks in the step (`take_attention_received`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.engine.paged_attention import PagedAttention, build_metadata
from tandem.engine.sequence import Sequence
from tandem.model.attention import AttentionBackend, AttentionVariant
from tandem.model.kv_pool import KVCacheFormat


@dataclass
class StepInputs:
    """One step as plain integers, the same on every rank of a parallel group (what rank 0
    broadcasts): the flat batch's tokens and positions, each scheduled sequence's (block_table,
    first position, tokens), and the rows of the flat batch whose logits are wanted, in order."""

    tokens: list[int]
    positions: list[int]
    rows: list[tuple[list[int], int, int]]
    picked: list[int]
    lora_slots: list[int] | None = None  # per sequence, its LoRA slot (-1: none); None: no adapter in the step


class ModelRunner:
    """model's share of the layers (`layers`, default all; a pipeline stage holds some) and their
    pools; `config` says the heads this share computes (tensor parallelism splits them)."""

    def __init__(self, model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int,
                 kv_format: KVCacheFormat, variant: AttentionVariant, backend: AttentionBackend,
                 layers: range | None = None):
        self.model, self.config = model, config
        self.block_size, self.num_blocks = block_size, num_blocks
        self.variant, self.backend = variant, backend
        self.layers = layers if layers is not None else range(config.num_layers)
        dtype, self.device = next(model.parameters()).dtype, next(model.parameters()).device
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # One pool per layer for K and for V, on the model's device (the default device while a
        # format plugin allocates, so plugins need not know about devices). Indexed by the layer's
        # number in the whole model: a stage's list is None before and after its layers.
        pad = [None] * self.layers.start
        with self.device:
            self.k_pools = pad + [kv_format.create_pool(*shape, dtype) for _ in self.layers]
            self.v_pools = pad + [kv_format.create_pool(*shape, dtype) for _ in self.layers]
        # Whether every step goes to the backend as key ranges (tandem's CPU paged attention):
        # then the per-step metadata is only slots and ranges, no masks.
        self.flat_only = backend.reads_pool_in_place(dtype, self.device, self.k_pools[self.layers.start], variant)
        self.scored = variant.eviction(block_size) is not None  # attention runs through backend.scored
        self._received: list[list[list[float]]] | None = None

    @property
    def pools(self) -> list:
        return [p for p in (*self.k_pools, *self.v_pools) if p is not None]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer before the forward writes to them."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for pool in self.pools:
            pool.copy_blocks(src, dst)

    # -- KV blocks in and out (the KV-cache store's data plane) ----------------------------------
    def _states(self) -> list[list[torch.Tensor]]:
        return [pool.state_tensors() for pool in self.pools]

    def block_layout(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each tensor of one exported block: (2 x layers, block_size, ...) per
        state tensor of the pool format (the data; for int8 also the scales)."""
        states = self._states()
        return [(t.dtype, (len(states), *t.shape[1:])) for t in states[0]]

    def export_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]]:
        """Copies of the blocks' KV, every layer's K then V, in host memory: one list of tensors per block."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        states = self._states()
        stacked = [torch.stack([s[j].index_select(0, ids) for s in states], 1).cpu() for j in range(len(states[0]))]
        return [[x[i] for x in stacked] for i in range(len(block_ids))]

    def import_blocks(self, block_ids: list[int], blocks: list[list[torch.Tensor]]) -> None:
        """Write exported blocks (export_blocks' format, checked against block_layout) into block_ids."""
        layout = self.block_layout()
        for tensors in blocks:
            got = [(t.dtype, tuple(t.shape)) for t in tensors]
            if got != layout:
                raise ValueError(f"a KV block of layout {got} does not fit this pool's {layout}")
        if not blocks:
            return
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for j in range(len(layout)):
            x = torch.stack([b[j] for b in blocks]).to(self.device)  # (n, 2 x layers, ...)
            for p, state in enumerate(self._states()):
                state[j][ids] = x[:, p]

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], copies: list[tuple[int, int]],
                sample_rows: list[int], num_rows: list[int] | None = None) -> torch.Tensor:
        """Run one step. sample_rows: indices into `scheduled` whose last computed token is to be
        sampled from; num_rows (aligned with it, default 1 each): how many of each one's last
        computed positions to return (speculative verification needs every guess's). Returns fp32
        logits (sum(num_rows), vocab) in host memory (sampling runs on the host), sequence by
        sequence, positions in order."""
        self.copy_blocks(copies)
        return self.run(prepare(scheduled, sample_rows, num_rows))

    def attention(self, rows: list[tuple[list[int], int, int]]) -> PagedAttention:
        """The attention context of a step (or a micro-batch) of these sequences."""
        meta = build_metadata(rows, self.block_size, self.variant, self.config.num_heads, self.flat_only, self.scored)
        return PagedAttention(self.k_pools, self.v_pools, meta.to(self.device), self.variant, self.backend)

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor:
        inputs = torch.tensor([step.tokens, step.positions], device=self.device)
        lora = getattr(self.model, "lora_context", None)
        if lora is not None and step.lora_slots is not None:  # each token's adapter, for every projection
            lora.set_slots(torch.tensor(step.lora_slots).repeat_interleave(torch.tensor([n for _, _, n in step.rows])))
        attn = self.attention(step.rows)
        try:
            hidden = self.model(inputs[:1], inputs[1:], attn)[0]  # (N, d)
        finally:
            if lora is not None:
                lora.set_slots(None)
        if attn.received is not None:
            self._received = [r.tolist() for r in attn.received]
        picked = torch.tensor(step.picked, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[picked]).float().cpu()


    def take_attention_received(self) -> list[list[list[float]]]:
        """Of the last step, per scheduled sequence: row r, what its r-th query block (counted from
        the block of its first new token) gave each block of its table, summed over heads, queries
        and layers. Scored steps only (a variant that evicts by attention)."""
        received, self._received = self._received, None
        return received


def prepare(scheduled: list[tuple[Sequence, int]], sample_rows: list[int],
            num_rows: list[int] | None = None) -> StepInputs:
    """The step's inputs: what each scheduled sequence computes, and which rows are sampled."""
    tokens, positions, rows, picked = [], [], [], []
    end = -1
    ends = []
    for seq, num in scheduled:
        start = seq.num_computed_tokens
        tokens += seq.tokens_to_compute(num)
        positions += range(start, start + num)
        rows.append((seq.block_table, start, num))
        end += num
        ends.append(end)  # the last row of each sequence
    for j, i in enumerate(sample_rows):
        count = 1 if num_rows is None else num_rows[j]
        picked += range(ends[i] - count + 1, ends[i] + 1)
    slots = [seq.lora_slot for seq, _ in scheduled]
    return StepInputs(tokens, positions, rows, picked, slots if any(s >= 0 for s in slots) else None)

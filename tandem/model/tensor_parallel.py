"""Megatron-LM tensor parallelism of the decoder (Shoeybi et al. 2019) over a torch.distributed
process group: `shard_model(model, rank, world)` turns a loaded model into rank `rank`'s share.

- q/k/v (fused) and gate/up (fused) are split by output columns: the rank's query heads, its KV
  heads (split when the world divides them, else replicated: one KV head a rank, the one its query
  heads read), its slice of the intermediate size. o and down are split by input rows and followed
  by one all-reduce each: two all-reduces a layer.
- An MoE layer keeps its router whole and splits every expert (and the shared expert) by its
  intermediate size, with one all-reduce after the block.
- The embedding and the LM head are split by vocabulary: each rank looks up its rows (the others
  count zero) and all-reduces; the logits are all-gathered.

Collectives run on the given group (gloo on CPUs, NCCL on GPUs). The model math is the single-rank
model's up to the order of the all-reduce's sums; tests/unit/model/test_tensor_parallel.py compares
logits. What runs the ranks (Ray actors, the engine's step on every rank) is not here yet.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tandem.errors import ConfigError
from tandem.model.moe import SparseMoE
from tandem.parallel import ParallelConfig


class _AllReduce(nn.Module):
    """Wraps a module whose outputs are partial sums across the ranks."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, *args):
        out = self.inner(*args)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding: other ids look up zeros; the sum over ranks is the lookup."""

    def __init__(self, weight: torch.Tensor, start: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = nn.functional.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """The LM head's rows [start, end): each rank's logits, gathered along the vocabulary."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.group = vocab_size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = nn.functional.linear(hidden, self.weight)
        rows = -(-self.vocab_size // dist.get_world_size(self.group))
        padded = nn.functional.pad(local, (0, rows - local.shape[-1]))  # gloo gathers equal shapes
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data = weight.contiguous()
    if bias is not None:
        out.bias.data = bias.contiguous()
    return out.requires_grad_(False)


def shard_model(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Rank `rank` of `world`'s share of a loaded (fused, unquantized) model, in place."""
    c = model.config
    ParallelConfig(tensor_parallel_size=world).check(c)
    if world == 1:
        return model
    if c.qk_norm == "full":
        raise ConfigError("tensor parallelism of a model with whole-projection q/k norms (OLMoE) is not "
                          "supported: each norm would need the other ranks' heads")
    heads, kv, dim = c.num_heads, c.num_kv_heads, c.head_dim
    q_per = heads // world
    q_heads = range(rank * q_per, (rank + 1) * q_per)
    kv_heads = range(rank * kv // world, rank * kv // world + kv // world) if kv % world == 0 \
        else range(q_heads[0] // (heads // kv), q_heads[0] // (heads // kv) + 1)

    def rows_of(head_range, offset: int) -> list[int]:
        return [offset + h * dim + i for h in head_range for i in range(dim)]

    qkv_rows = torch.tensor(rows_of(q_heads, 0) + rows_of(kv_heads, heads * dim)
                            + rows_of(kv_heads, (heads + kv) * dim))
    o_cols = torch.tensor(rows_of(q_heads, 0))
    for layer in model.model.layers:
        attn = layer.self_attn
        if not isinstance(attn.qkv_proj, nn.Linear):
            raise ConfigError("tensor parallelism needs unquantized projections (quantization='none')")
        qkv = attn.qkv_proj
        attn.qkv_proj = _linear(qkv.weight[qkv_rows], None if qkv.bias is None else qkv.bias[qkv_rows])
        attn.o_proj = _AllReduce(_linear(attn.o_proj.weight[:, o_cols], None), group)
        attn.num_heads, attn.num_kv_heads = q_per, len(kv_heads)
        if isinstance(layer.mlp, SparseMoE):
            _shard_moe(layer.mlp, rank, world)
            layer.mlp = _AllReduce(layer.mlp, group)
        else:
            _shard_mlp(layer.mlp, rank, world)
            layer.mlp.down_proj = _AllReduce(layer.mlp.down_proj, group)
    vocab = c.vocab_size
    per = -(-vocab // world)
    start, end = rank * per, min((rank + 1) * per, vocab)
    head_weight = model.lm_head.weight
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens.weight[start:end].clone(), start, group)
    model.lm_head = VocabParallelHead(head_weight[start:end].clone(), vocab, group)
    if c.tie_word_embeddings:  # one tensor for both, as in the unsplit model
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _shard_mlp(mlp: nn.Module, rank: int, world: int) -> None:
    """gate/up by output columns (the fused gate_up_proj's two halves), down by input rows."""
    inner = mlp.down_proj.weight.shape[1]
    per = inner // world
    cols = slice(rank * per, (rank + 1) * per)
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
    mlp.gate_up_proj = _linear(torch.cat([gate[cols], up[cols]]), None)
    mlp.down_proj = _linear(mlp.down_proj.weight[:, cols], None)


def _shard_moe(moe: SparseMoE, rank: int, world: int) -> None:
    experts = moe.experts
    inner = experts.down_proj.shape[2]
    per = inner // world
    cols = slice(rank * per, (rank + 1) * per)
    gate, up = experts.gate_up_proj.data.chunk(2, dim=1)
    experts.gate_up_proj = nn.Parameter(torch.cat([gate[:, cols], up[:, cols]], dim=1).contiguous(),
                                        requires_grad=False)
    experts.down_proj = nn.Parameter(experts.down_proj.data[:, :, cols].contiguous(), requires_grad=False)
    if moe.shared_expert is not None:
        _shard_mlp(moe.shared_expert, rank, world)

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
logits. The all-reduces add the ranks' parts in rank order (all_reduce_in_order), so a token's
result does not depend on the batch. tandem/engine/distributed.py runs the engine's step on the ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tandem.errors import ConfigError
from tandem.model.moe import SparseMoE
from tandem.parallel import ParallelConfig


def all_reduce_in_order(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over the ranks, each element added in rank order whatever the tensor's size: a
    ring all-reduce chunks the buffer by its size, so an element's order of addition (and its
    last bits, with 3 ranks or more) would depend on how many tokens the step has, and the
    engine's outputs on the batch. All-gather, then add in order: exact batch invariance, at the
    price of W x the bytes (small on a CPU: activations of one step)."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


class _AllReduce(nn.Module):
    """Wraps a module whose outputs are partial sums across the ranks."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, *args):
        return all_reduce_in_order(self.inner(*args), self.group)


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
        return all_reduce_in_order(out, self.group)


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


def shard_model(model: nn.Module, rank: int, world: int, group=None, *, tensor: bool = True,
                experts: bool = False) -> nn.Module:
    """Rank `rank` of `world`'s share of a loaded (fused, unquantized) model, in place.

    tensor: split the attention, the dense feed-forward layers and the vocabulary (Megatron).
    experts: place whole experts, num_experts / world a rank, with all-to-all dispatch and combine
    (tandem.model.expert_parallel); without it, tensor parallelism splits every expert by its
    intermediate size. experts alone (tensor=False) keeps everything else whole on each rank."""
    c = model.config
    size = world if tensor else 1
    ParallelConfig(tensor_parallel_size=size, expert_parallel_size=world if experts else 1).check(c)
    if world == 1:
        return model
    if experts:
        from tandem.model.expert_parallel import shard_experts

        shard_experts(model, rank, world, group, tokens_replicated=True)
    if not tensor:
        return model
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
        if isinstance(layer.mlp, SparseMoE) and experts:  # whole experts; only the shared one is split
            if layer.mlp.shared_expert is not None:
                _shard_mlp(layer.mlp.shared_expert, rank, world)
                layer.mlp.shared_expert.down_proj = _AllReduce(layer.mlp.shared_expert.down_proj, group)
        elif isinstance(layer.mlp, SparseMoE):
            _shard_moe(layer.mlp, rank, world)
            layer.mlp = _AllReduce(layer.mlp, group)
        else:
            _shard_mlp(layer.mlp, rank, world)
            layer.mlp.down_proj = _AllReduce(layer.mlp.down_proj, group)
    vocab = c.vocab_size
    per = -(-vocab // world)
    start, end = rank * per, min((rank + 1) * per, vocab)
    embed, head = model.model.embed_tokens, model.lm_head  # a pipeline stage may hold neither
    if embed is not None:
        model.model.embed_tokens = VocabParallelEmbedding(embed.weight[start:end].clone(), start, group)
    if head is not None:
        model.lm_head = VocabParallelHead(head.weight[start:end].clone(), vocab, group)
        if c.tie_word_embeddings and embed is not None:  # one tensor for both, as in the unsplit model
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

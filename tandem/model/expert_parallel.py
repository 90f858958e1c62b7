"""Expert parallelism of MoE layers (GShard, Lepikhin et al. 2020; DeepSpeed-MoE) over a
torch.distributed group: each rank holds num_experts / world of each layer's experts and its own
batch of tokens (the rest of the model replicated: data-parallel attention). In each MoE layer a
rank routes its tokens, sends each (token, expert) assignment's activations to the rank that owns
the expert (all-to-all dispatch), runs its experts over what it received, and sends the results
back (all-to-all combine), where they are summed with the router's weights in expert order.

`shard_experts(model, rank, world)` installs it in a loaded model; a rank's tokens then come out as
they do from the unsplit model (tests/unit/model/test_expert_parallel.py). In the engine's parallel
group every rank runs the same step (TokenShardedExperts: each dispatches a share of the tokens).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.errors import ConfigError
from tandem.model.moe import Experts, SparseMoE


class ExpertParallelExperts(nn.Module):
    """Experts [first, first + local) of num_experts, with all-to-all dispatch and combine."""

    def __init__(self, experts: Experts, rank: int, world: int, group=None):
        super().__init__()
        total = experts.num_experts
        if total % world:
            raise ConfigError(f"expert_parallel_size {world} does not divide the {total} experts")
        self.num_experts, self.local, self.group = total, total // world, group
        self.first = rank * self.local
        own = slice(self.first, self.first + self.local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[own].clone(), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.data[own].clone(), requires_grad=False)

    def _exchange(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=self.group)
        return out

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        world, k = dist.get_world_size(self.group), top_i.shape[1]
        flat = top_i.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_experts)
        order = torch.argsort(flat, stable=True)  # by expert, hence by owner rank
        send = counts.view(world, self.local).sum(1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        rows = self._exchange(x[order // k], send_counts, recv_counts)  # dispatch
        experts = self._exchange(flat[order], send_counts, recv_counts) - self.first
        results = torch.empty_like(rows)
        for e in range(self.local):  # each local expert once over everything it received
            mine = (experts == e).nonzero().squeeze(1)
            if mine.numel():
                gate, up = F.linear(rows[mine], self.gate_up_proj[e]).chunk(2, dim=-1)
                results[mine] = F.linear(F.silu(gate) * up, self.down_proj[e])
        back = self._exchange(results, recv_counts, send_counts)  # combine: in `order`, by expert
        out = torch.zeros_like(x)
        weights = top_w.reshape(-1)[order]
        start = 0
        for n in counts.tolist():  # summed in expert order, as the unsplit layer does
            if n:
                part = back[start:start + n] * weights[start:start + n, None]
                out.index_add_(0, order[start:start + n] // k, part.to(out.dtype))
            start += n
        return out, counts.tolist()


class TokenShardedExperts(ExpertParallelExperts):
    """Expert parallelism where every rank holds the same tokens (the engine's group: the ranks
    run one step together, the attention split by heads or whole): each rank dispatches a
    contiguous share of the tokens, [N r / W, N (r + 1) / W), and the results come back to all
    ranks by an all-reduce of disjoint rows (exact: each row is one rank's and zeros). Each expert
    still runs once over the tokens routed to it; the router statistics count all the tokens."""

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        from tandem.model.tensor_parallel import all_reduce_in_order

        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        n = x.shape[0]
        lo, hi = n * rank // world, n * (rank + 1) // world
        part, _ = super().forward(x[lo:hi], top_i[lo:hi], top_w[lo:hi])
        out = torch.zeros_like(x)
        out[lo:hi] = part
        counts = torch.bincount(top_i.reshape(-1), minlength=self.num_experts).tolist()
        return all_reduce_in_order(out, self.group), counts


def shard_experts(model: nn.Module, rank: int, world: int, group=None, tokens_replicated: bool = False) -> nn.Module:
    """Every MoE layer's experts split over `world` ranks (this one keeps its share), in place.
    tokens_replicated: every rank runs the same tokens (TokenShardedExperts); otherwise each rank
    has its own batch (data-parallel attention)."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not layers:
        raise ConfigError(f"expert_parallel_size {world}: the model has no experts")
    kind = TokenShardedExperts if tokens_replicated else ExpertParallelExperts
    for moe in layers:
        moe.experts = kind(moe.experts, rank, world, group)
    return model

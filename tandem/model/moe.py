"""Sparse mixture-of-experts feed-forward layers (Shazeer et al. 2017; Jiang et al. 2024, Mixtral):
a router picks each token's top-k experts, the chosen SwiGLU experts run, and their outputs are
summed with the router's weights. Mixtral, Qwen2-MoE/Qwen3-MoE and OLMoE differ only in the
routing options (renormalised top-k or not) and Qwen2-MoE's gated shared expert (MoEConfig).

The experts are stored stacked, as transformers 5 stores them: gate_up_proj (E, 2I, d) and
down_proj (E, d, I); the loader stacks checkpoints that keep one tensor per expert. A forward sorts
the (token, expert) pairs by expert and runs each chosen expert once over all of its tokens
(experts_forward: one matmul pair per active expert; on a GPU, tandem.kernels.fused_moe's grouped
launches), never a loop over tokens. Each token's output is accumulated in expert
order whatever the batch, as transformers does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import ModelConfig


def experts_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_i: torch.Tensor,
                    top_w: torch.Tensor) -> torch.Tensor:
    """x (N, d) through its top-k experts (top_i, top_w (N, k)), gate_up (E, 2I, d), down (E, d, I):
    the assignments sorted by expert, one gate/up and one down matmul per expert with tokens, each
    token's outputs summed in expert order (as transformers does). tandem.kernels.fused_moe runs
    the same on a GPU in two grouped launches, with this as its reference."""
    k = top_i.shape[1]
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    tokens, weights = order // k, top_w.reshape(-1)[order]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start:start + count]
        gate, up = F.linear(x[rows], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert]) * weights[start:start + count, None]
        out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out


class Experts(nn.Module):
    """num_experts SwiGLU experts: forward(x (N, d), top_i (N, k), top_w (N, k)) -> (N, d).
    `impl` computes them: experts_forward, or on a GPU the Triton kernel tandem.LLM installs."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.impl = experts_forward

    def forward(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Also returns the number of tokens each expert took (the router statistics)."""
        counts = torch.bincount(top_i.reshape(-1), minlength=self.num_experts).tolist()
        return self.impl(x, self.gate_up_proj, self.down_proj, top_i, top_w), counts

    def extra_repr(self) -> str:
        e, two_i, d = self.gate_up_proj.shape
        return f"num_experts={e}, hidden_size={d}, intermediate_size={two_i // 2}"


class SparseMoE(nn.Module):
    """The feed-forward block of a sparse layer: router (`gate`), experts, optional shared expert.
    `tokens_per_expert` counts the tokens routed to each expert since the model loaded."""

    def __init__(self, config: ModelConfig, dense_mlp: type[nn.Module]):
        super().__init__()
        m, d = config.moe, config.hidden_size
        self.top_k, self.normalize_top_k = m.top_k, m.normalize_top_k
        self.gate = nn.Linear(d, m.num_experts, bias=False)
        self.experts = Experts(m.num_experts, d, m.expert_intermediate_size)
        shared = m.shared_expert_intermediate_size
        self.shared_expert = dense_mlp(d, shared) if shared else None
        self.shared_expert_gate = nn.Linear(d, 1, bias=False) if shared else None
        self.tokens_per_expert = [0] * m.num_experts  # host-side counts (a module on meta holds no tensors)

    def fuse(self) -> None:
        if self.shared_expert is not None:
            self.shared_expert.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_w, top_i) (N, k): the chosen experts' softmax probabilities (fp32) and ids."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w, top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_w, top_i = self.route(flat)
        out, counts = self.experts(flat, top_i, top_w.to(flat.dtype))
        self.tokens_per_expert = [a + b for a, b in zip(self.tokens_per_expert, counts)]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)


def router_stats(model: nn.Module) -> dict[str, float]:
    """Tokens routed per expert, summed over the sparse layers, and their imbalance (the busiest
    expert's count over the mean; 1.0 is perfectly even), since the model loaded. Empty for a
    dense model."""
    counts = [m.tokens_per_expert for m in model.modules() if isinstance(m, SparseMoE)]
    if not counts:
        return {}
    total = [float(sum(column)) for column in zip(*counts)]
    mean = sum(total) / len(total)
    stats = {"moe_routed_tokens": sum(total), "moe_expert_imbalance": max(total) / mean if mean else 1.0}
    stats |= {f"moe_tokens_expert_{e}": n for e, n in enumerate(total)}
    return stats

"""The attention context: what a model's attention layer hands its new keys/values to.

A context owns the KV cache of the tokens in the current forward and knows which sequence each
token belongs to. The model stays ignorant of caching and batching: it calls
`attend(layer, q, k, v)` with the flat batch's projections and gets the attention output back.
Implementations: `tandem.model.kv_cache.KVCache` (one sequence, contiguous: the reference) and
`tandem.engine.paged_attention.PagedAttention` (many sequences, block tables: the engine's).
"""
from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (N, H_kv, D) of the N new tokens in the cache and return the attention
        output (N, H, D) of q (N, H, D) over each token's sequence (cached tokens + new tokens up
        to and including itself)."""
        ...


def causal_mask(num_new: int, num_cached: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask (T, S) letting new token i see the cached tokens and new tokens <= i; None if trivial."""
    if num_new == 1:
        return None
    total = num_cached + num_new
    query_pos = torch.arange(num_cached, total, device=device).unsqueeze(1)
    return torch.arange(total, device=device).unsqueeze(0) <= query_pos


def attend_one_sequence(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_cached: int) -> torch.Tensor:
    """Causal attention of one sequence's T new queries (T, H, D) over its S = num_cached + T
    keys/values (S, H_kv, D). Grouped-query heads are matched by SDPA's enable_gqa."""
    q_t, k_t, v_t = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # (H, T, D), (Hkv, S, D)
    if num_cached == 0:
        out = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=q.shape[0] > 1,
                                                               enable_gqa=True)
    else:
        mask = causal_mask(q.shape[0], num_cached, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)  # (T, H, D)

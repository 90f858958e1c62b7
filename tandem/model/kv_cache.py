"""A contiguous per-sequence KV cache: the simplest correct cache, and the reference for paged ones.

Layout per layer: (B, H_kv, max_len, D). All rows of a batch share one length; the attention
layer asks the cache for the keys/values to attend to and for the mask that goes with them, so a
paged cache can take its place behind the same two methods.
"""
from __future__ import annotations

import torch

from tandem.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every row)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D) after the cached tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer stored its new tokens."""
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget tokens past `length` (speculative rollback, re-prefill)."""
        self.length = min(self.length, length)


def causal_mask(num_new: int, num_cached: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask (T, S) letting new token i see cached tokens and new tokens <= i; None if trivial."""
    if num_new == 1:
        return None
    total = num_cached + num_new
    query_pos = torch.arange(num_cached, total, device=device).unsqueeze(1)
    return torch.arange(total, device=device).unsqueeze(0) <= query_pos

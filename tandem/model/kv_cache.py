"""A contiguous single-sequence KV cache: the simplest correct cache, and the reference the paged
engine is tested against. Layout per layer: (max_len, H_kv, D).
"""
from __future__ import annotations

import torch

from tandem.config import ModelConfig
from tandem.model.attention import attend_one_sequence


class KVCache:
    """An AttentionContext for one sequence. The caller calls `advance(n)` after each forward."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (config.num_layers, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens stored by completed forwards

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.length + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer, self.length:end] = k
        self.v[layer, self.length:end] = v
        return attend_one_sequence(q, self.k[layer, :end], self.v[layer, :end], self.length)

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer stored its new tokens."""
        self.length += num_tokens

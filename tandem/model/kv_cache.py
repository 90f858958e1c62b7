"""A contiguous single-sequence KV cache: the simplest correct cache, and the reference the paged
engine is tested against. Layout per layer: (max_len, H_kv, D). It keeps every token (no rolling
window): use it for scoring and as a reference, the engine's paged pool for serving.
"""
from __future__ import annotations

import torch

from tandem.config import ModelConfig
from tandem.errors import ConfigError
from tandem.model.attention import (DEFAULT_BACKEND, DEFAULT_VARIANT, AttentionBackend, AttentionMask,
                                    AttentionVariant, fresh_causal_mask, tensors_to)


class KVCache:
    """An AttentionContext for one sequence. The caller calls `advance(n)` after each forward."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", variant: AttentionVariant = DEFAULT_VARIANT,
                 backend: AttentionBackend = DEFAULT_BACKEND):
        if type(variant).eviction is not AttentionVariant.eviction:
            raise ConfigError(f"attention {variant.describe()} evicts by received attention, which a contiguous "
                              "cache that keeps every key cannot do: score through the engine (LLMEngine.score)")
        shape = (config.num_layers, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.num_heads = max_len, config.num_heads
        self.variant, self.backend = variant, backend
        self.length = 0  # tokens stored by completed forwards
        self._mask: tuple[int, int, AttentionMask] | None = None  # built once per forward, not per layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.length + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer, self.length:end] = k
        self.v[layer, self.length:end] = v
        if k.shape[0] == 1 and self.variant.is_plain_causal:  # one new token sees every key: the decode path
            return self.backend.decode(q, self.k[layer, None, :end], self.v[layer, None, :end], self._mask_for(end))
        return self.backend.prefill(q, self.k[layer, :end], self.v[layer, :end], self._mask_for(end))

    def _mask_for(self, end: int) -> AttentionMask:
        if self._mask is None or self._mask[:2] != (self.length, end):
            if end - self.length == 1 and self.variant.is_plain_causal:
                mask = AttentionMask(torch.ones(1, 1, end, dtype=torch.bool))
            elif self.length == 0:
                mask = fresh_causal_mask(self.variant, end, self.num_heads)
            else:
                mask = AttentionMask.build(self.variant, torch.arange(self.length, end), torch.arange(end),
                                           self.num_heads)
            self._mask = (self.length, end, tensors_to(mask, self.k.device))
        return self._mask[2]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer stored its new tokens."""
        self.length += num_tokens

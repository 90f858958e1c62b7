"""Built-in attention variants and backends.

Variants (each a mask or bias rule on one attention path):
- causal: every earlier key (the default).
- sliding_window: the last `window` keys including the query's own (Mistral, Jiang et al. 2023);
  older KV blocks are freed, so the cache stops growing at the window (a rolling KV).
- sinks: the first `num_sink` tokens plus the last `window` (StreamingLLM, Xiao et al. 2023). Keys
  keep their original positions (Mistral-style), not positions re-numbered inside the cache.
- alibi: causal, plus a per-head linear distance penalty m_h * (k - q) instead of RoPE
  (Press et al. 2022), with the paper's slopes for any head count.
- local_global: a causal local window plus global tokens everyone sees: the first `num_global`
  tokens and, with `stride`, every stride-th token (Longformer / BigBird's local+global pattern
  in its causal form; Sparse Transformer's strided keys).
- h2o: Heavy-Hitter Oracle (Zhang et al. 2023): a sequence keeps at most `budget` tokens of KV, the
  last `recent` positions plus the blocks that received the most attention so far; the rest are
  evicted to the pool. Causal over the keys it keeps, which keep their positions. Scores: each
  key's softmax probability summed over the queries that saw it, the query heads and the layers
  (the paper keeps one per head and layer; a paged cache evicts a whole block, shared by every
  head and layer, so one sum decides); a block's score is its tokens' sum. At each block boundary
  from `budget` on, the lowest-scoring blocks wholly outside the recent window are evicted until
  the sequence holds budget / block_size - 1 full blocks plus the one being written (ties: the
  older block). Its attention runs through the backend's `scored` path (never the fused CPU
  layer: it needs the probabilities). Options: budget, recent (tokens, multiples of the engine's
  block size, recent < budget).
Backends: sdpa (torch SDPA; the CPU default) and naive (explicit fp32 softmax(QK^T/sqrt(D) + bias)V:
the reference every other backend is tested against).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.errors import ConfigError
from tandem.model.attention import (AttentionBackend, AttentionMask, AttentionVariant, CausalAttention, KVEviction,
                                    KVRetention)
from tandem.plugins import hookimpl


def _positive_int(variant: str, key: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"attention variant {variant!r}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


class SlidingWindow(AttentionVariant):
    name = "sliding_window"

    def __init__(self, window: int = 4096):
        self.window = _positive_int(self.name, "window", window)

    def allowed(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    def retention(self):
        return KVRetention(0, self.window)

    def key_window(self):  # a subclass with its own mask is not a plain window any more
        return self.window if type(self).allowed is SlidingWindow.allowed and type(self).bias is SlidingWindow.bias else None


class AttentionSinks(AttentionVariant):
    name = "sinks"

    def __init__(self, num_sink: int = 4, window: int = 1024):
        self.num_sink = _positive_int(self.name, "num_sink", num_sink, 0)
        self.window = _positive_int(self.name, "window", window)

    def allowed(self, q_pos, k_pos):
        return (k_pos <= q_pos) & ((k_pos > q_pos - self.window) | (k_pos < self.num_sink))

    def retention(self):
        return KVRetention(self.num_sink, self.window)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads a power of
    two; otherwise those of the nearest lower power of two, then every other slope of the next one."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower)
    if lower != num_heads:
        slopes += power_of_two(2 * lower)[0::2][:num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(AttentionVariant):
    name = "alibi"
    rotary = False

    def bias(self, q_pos, k_pos, num_heads):
        distance = (k_pos - q_pos).float()  # (..., T, S), <= 0 where allowed
        slopes = alibi_slopes(num_heads).view(num_heads, 1, 1)
        return slopes * distance.unsqueeze(-3)  # (..., H, T, S)


class LocalGlobal(AttentionVariant):
    name = "local_global"

    def __init__(self, window: int = 512, num_global: int = 16, stride: int = 0):
        self.window = _positive_int(self.name, "window", window)
        self.num_global = _positive_int(self.name, "num_global", num_global, 0)
        self.stride = _positive_int(self.name, "stride", stride, 0)

    def allowed(self, q_pos, k_pos):
        visible = (k_pos > q_pos - self.window) | (k_pos < self.num_global)
        if self.stride:
            visible = visible | (k_pos % self.stride == self.stride - 1)
        return (k_pos <= q_pos) & visible

    def retention(self):
        return None if self.stride else KVRetention(self.num_global, self.window)


class H2O(AttentionVariant):
    name = "h2o"

    def __init__(self, budget: int = 1024, recent: int = 512):
        self.budget = _positive_int(self.name, "budget", budget, 2)
        self.recent = _positive_int(self.name, "recent", recent)
        if recent >= budget:
            raise ConfigError(f"attention variant 'h2o': recent ({recent}) must be below budget ({budget}): "
                              "the rest of the budget holds the heavy hitters")

    def key_window(self):  # it needs the attention probabilities: the scored path, not the CPU kernels
        return None

    def eviction(self, block_size: int) -> H2OEviction:
        for key in ("budget", "recent"):
            if getattr(self, key) % block_size:
                raise ConfigError(f"attention variant 'h2o': {key} ({getattr(self, key)}) must be a multiple of "
                                  f"the KV block size ({block_size}): whole blocks are evicted")
        return H2OEviction(block_size, self.budget, self.recent)


@dataclass(frozen=True)
class H2OEviction(KVEviction):
    """H2O at a block size: evicts at each block boundary from `budget` on (see the module docstring)."""

    block_size: int
    budget: int  # tokens, a multiple of block_size
    recent: int  # tokens, a multiple of block_size, < budget

    @property
    def max_blocks(self) -> int:
        return self.budget // self.block_size

    @property
    def first_eviction(self) -> int:
        return self.budget

    def step_end(self, num_computed: int) -> int:
        if num_computed < self.budget:  # nothing is evicted before the budget: any chunking
            return self.budget
        return (num_computed // self.block_size + 1) * self.block_size  # stop at the next boundary

    def select(self, block_scores: list[float], live: list[int], num_computed: int) -> list[int]:
        if num_computed < self.budget or num_computed % self.block_size:
            return []
        num_over = len(live) - (self.max_blocks - 1)  # leave room for the block written next
        recent_start = num_computed - self.recent
        candidates = [i for i in live if (i + 1) * self.block_size <= recent_start]
        candidates.sort(key=lambda i: (block_scores[i] if i < len(block_scores) else 0.0, i))
        return sorted(candidates[:max(0, num_over)])


class NaiveBackend(AttentionBackend):
    """The reference: fp32 scores, explicit mask and bias, KV heads repeated for GQA."""

    name = "naive"

    def prefill(self, q, keys, values, mask: AttentionMask):
        num_tokens, num_keys = q.shape[0], keys.shape[0]
        allowed = mask.allowed
        if allowed is None:
            allowed = torch.ones(num_tokens, num_keys, dtype=torch.bool).tril(num_keys - num_tokens)
        return self._attend(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), allowed.unsqueeze(0),
                            None if mask.bias is None else mask.bias.unsqueeze(0))[0]

    def decode(self, q, keys, values, mask: AttentionMask):
        return self._attend(q.unsqueeze(1), keys, values, mask.allowed,
                            None if mask.bias is None else mask.bias)[:, 0]

    @staticmethod
    def _attend(q, keys, values, allowed, bias):
        """q (B, T, H, D), keys/values (B, S, Hkv, D), allowed (B, T, S), bias (B, H, T, S) -> (B, T, H, D)."""
        group = q.shape[2] // keys.shape[2]
        k = keys.float().repeat_interleave(group, dim=2)
        v = values.float().repeat_interleave(group, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)
        return out.to(q.dtype)


@hookimpl
def tandem_attention_variants(api_version: int):
    return [CausalAttention, SlidingWindow, AttentionSinks, ALiBi, LocalGlobal, H2O]


@hookimpl
def tandem_attention_backends(api_version: int):
    return [AttentionBackend, NaiveBackend]

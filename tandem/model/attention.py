"""Attention: the context the model hands its keys/values to, the variant that says which keys a
query sees, and the backend that computes it (STYLE.md rule 14: variants are parameters of one
attention path, not copies of it).

- An `AttentionContext` owns the KV cache of the tokens in the current forward and knows which
  sequence each token belongs to: `KVCache` (one sequence, contiguous: the reference) and the
  engine's `PagedAttention` (many sequences, block tables).
- An `AttentionVariant` is a rule on (query position, key position): `allowed` (a boolean mask:
  causal, sliding window, sinks, sparse...), an optional additive `bias` (ALiBi), and the
  `retention` that says which old keys can never be seen again (so the engine frees their blocks:
  the rolling KV of sliding-window models). A variant may instead evict by the attention keys
  received (`eviction`, a `KVEviction`: H2O's heavy hitters): the engine then runs its attention
  through the backend's `scored`, which also returns the softmax probabilities each key got.
- An `AttentionBackend` computes softmax(q k^T / sqrt(D) + bias, masked) v for prefill chunks and
  for batched decode over a paged pool: SDPA here (the CPU default); the naive reference and
  Triton kernels are plugins.

Masks and biases are built once per step (not per layer) from positions, into an `AttentionMask`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from tandem.errors import ConfigError
from tandem.kernels.cpu import ops as cpu_ops


class AttentionContext(Protocol):
    variant: AttentionVariant

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (N, H_kv, D) of the N new tokens in the cache and return the attention
        output (N, H, D) of q (N, H, D) over each token's sequence (the cached tokens the variant
        lets it see + new tokens up to and including itself)."""
        ...


@dataclass(frozen=True)
class KVRetention:
    """Which keys a variant may still need: the first `num_sink` positions and the last `window`
    positions before (and including) the newest query. Everything else can be freed."""

    num_sink: int
    window: int

    def first_live_position(self, next_query_position: int) -> int:
        """Keys before this (and not sinks) are dead for every query at or after next_query_position."""
        return next_query_position - self.window + 1


class KVEviction:
    """A variant's eviction of whole KV blocks by the attention they received (H2O's heavy
    hitters, Zhang et al. 2023), bound to the engine's block size. The engine keeps, per sequence,
    the attention each KV block has received (softmax probabilities summed over queries, heads and
    layers), and after each step asks `select` which blocks to drop: their table entries become
    NULL_BLOCK holes (attention skips them; the other keys keep their positions) and the blocks go
    back to the pool. So that a decision depends on the sequence alone, never on how the scheduler
    chunked it, eviction happens only at `step_end` positions, which no step crosses, and a prefix
    hit stops before `first_eviction`."""

    max_blocks: int  # KV blocks a sequence holds at most between steps
    first_eviction: int  # the first position (a block boundary) at which select may evict

    def step_end(self, num_computed: int) -> int:
        """How far (exclusive) the next step of a sequence with num_computed tokens may compute."""
        raise NotImplementedError

    def select(self, block_scores: list[float], live: list[int], num_computed: int) -> list[int]:
        """Which of `live` (table indices of the blocks holding computed tokens) to evict now;
        block_scores[i]: the attention block i has received so far."""
        raise NotImplementedError


class AttentionVariant:
    """Base class and the default: plain causal attention (every earlier key, and the query's own).

    Subclass it, set `name`, and override `allowed` and/or `bias` (and `retention` when old keys
    stop being visible). Options come as keyword arguments to the constructor, validated there.
    Every query must be allowed to see its own key (so no row is fully masked).
    """

    name: ClassVar[str] = "causal"
    api_version: ClassVar[int] = 1
    rotary: ClassVar[bool] = True  # False for variants that replace RoPE (ALiBi): the model skips it

    def __init__(self, **options):
        if options:
            raise ConfigError(f"attention variant {self.name!r} takes no options, got {sorted(options)}")

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean mask, True where the query at q_pos (..., T, 1) may see the key at k_pos (..., 1, S)."""
        return k_pos <= q_pos

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int) -> torch.Tensor | None:
        """Additive fp32 bias (..., H, T, S) on the scores, or None."""
        return None

    def retention(self) -> KVRetention | None:
        """Which keys stay visible to future queries; None: all of them (nothing is ever freed)."""
        return None

    def eviction(self, block_size: int) -> KVEviction | None:
        """The variant's eviction by received attention at this block size (ConfigError when it
        does not fit it), or None: it evicts nothing by attention. A variant that evicts must also
        return None from `key_window` (its attention runs through `AttentionBackend.scored`)."""
        return None

    @property
    def is_plain_causal(self) -> bool:
        cls = type(self)
        return cls.allowed is AttentionVariant.allowed and cls.bias is AttentionVariant.bias

    def key_window(self) -> int | None:
        """W when this variant lets a query see exactly the last W keys up to and including its
        own (0: every earlier key, plain causal), with no bias; None for any other mask. Kernels
        that take the visible keys as a position range (tandem's CPU paged attention) need it."""
        return 0 if self.is_plain_causal else None

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({options})"


def tensors_to(x, device: torch.device):
    """x with every tensor in it on `device`: a tensor, or frozen dataclasses and tuples of them
    (attention metadata is built on the host and used where the model is). No-op for the CPU."""
    if device.type == "cpu":
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: tensors_to(getattr(x, f.name), device)
                                         for f in dataclasses.fields(x) if f.init})
    if isinstance(x, tuple):
        return tuple(tensors_to(v, device) for v in x)
    return x


@dataclass(frozen=True)
class ConsecutiveKeys:
    """How a mask was built, for kernels that compute the mask from positions instead of reading
    it: by `variant`, over keys that are, in every row, the first `num_keys` key slots at
    consecutive positions, the last of them the row's last query's (its queries consecutive too:
    bottom-right aligned). A variant whose rule depends on key - query distance only is then a
    kernel's causal/window/bias parameters, exactly."""

    variant: AttentionVariant
    num_keys: torch.Tensor  # (...,) int64: real keys per row (the mask's leading dims)


@dataclass(frozen=True)
class AttentionMask:
    """allowed: bool (..., T, S), or None for plain causal attention of fresh tokens (keys ==
    queries, SDPA's is_causal). bias: fp32 (..., H, T, S) or None. keys: set by `build` when
    the keys are consecutive (see ConsecutiveKeys), else None."""

    allowed: torch.Tensor | None
    bias: torch.Tensor | None = None
    keys: ConsecutiveKeys | None = None

    @staticmethod
    def build(variant: AttentionVariant, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int,
              valid: torch.Tensor | None = None) -> AttentionMask:
        """Mask of queries q_pos (..., T) over keys k_pos (..., S); valid (..., S) marks real keys
        (False for the padding of a batched decode)."""
        q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
        allowed = variant.allowed(q, k)
        if valid is not None:
            allowed = allowed & valid.unsqueeze(-2)
        return AttentionMask(allowed, variant.bias(q, k, num_heads), _consecutive_keys(variant, q_pos, k_pos, valid))


def _consecutive_keys(variant: AttentionVariant, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      valid: torch.Tensor | None) -> ConsecutiveKeys | None:
    num_queries, num_slots = q_pos.shape[-1], k_pos.shape[-1]
    lead = torch.broadcast_shapes(q_pos.shape[:-1], k_pos.shape[:-1], () if valid is None else valid.shape[:-1])
    q_pos, k_pos = q_pos.expand(*lead, num_queries), k_pos.expand(*lead, num_slots)
    slots = torch.arange(num_slots, device=k_pos.device)
    if valid is None:
        num_keys = torch.full(lead, num_slots, dtype=torch.long, device=k_pos.device)
    else:
        valid = valid.expand(*lead, num_slots)
        num_keys = valid.sum(-1)
        if not torch.equal(valid, slots < num_keys.unsqueeze(-1)):
            return None  # real keys are not a prefix of the slots
    last_query = q_pos[..., -1:]
    if not torch.equal(q_pos, last_query - torch.arange(num_queries - 1, -1, -1, device=q_pos.device)):
        return None
    expected = last_query - num_keys.unsqueeze(-1) + 1 + slots  # (..., S) consecutive, ending at the last query
    if not bool(((k_pos == expected) | (slots >= num_keys.unsqueeze(-1))).all()):
        return None
    return ConsecutiveKeys(variant, num_keys)


def fresh_causal_mask(variant: AttentionVariant, num_tokens: int, num_heads: int) -> AttentionMask:
    """The mask of a prompt with nothing cached: None where SDPA's own causal path applies."""
    if variant.is_plain_causal:
        return AttentionMask(None)
    positions = torch.arange(num_tokens)
    return AttentionMask.build(variant, positions, positions, num_heads)


# Where a variant's mask is checked: every position below 64, and 48 consecutive positions
# straddling each power of two from 128 to 8192 (chunk, block and window edges sit there): 400
# positions, a (400, 400) bool mask, 0.4-1.2 ms for the built-ins on a 2-core CPU, run once per
# variant when it loads and when an engine builds it.
MASK_CHECK_POSITIONS = torch.cat([torch.arange(64)] + [torch.arange(2 ** e - 24, 2 ** e + 24) for e in range(7, 14)])


def mask_problem(variant: AttentionVariant, positions: torch.Tensor = MASK_CHECK_POSITIONS) -> str | None:
    """Why the engine cannot use this variant's mask, or None. The mask must be a bool tensor, let
    every query see its own key (else a row is fully masked), and be causal: the KV cache computes
    each token once, so a query that sees later keys in a prefill (where they exist) would see
    fewer in decode (where they do not yet): outputs change silently with chunking and caching."""
    q_pos, k_pos = positions.view(-1, 1), positions.view(1, -1)
    allowed = variant.allowed(q_pos, k_pos)
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        return f"is not a bool tensor: allowed() returned {getattr(allowed, 'dtype', type(allowed).__name__)}"
    allowed = allowed.broadcast_to((len(positions), len(positions)))
    hidden = (~allowed.diagonal()).nonzero().flatten()
    if len(hidden):
        return f"hides query {int(positions[hidden[0]])} from its own key (a query must see its own key)"
    later = (allowed & (k_pos > q_pos)).nonzero()
    if len(later):
        q, k = int(positions[later[0, 0]]), int(positions[later[0, 1]])
        return (f"is not causal: query {q} sees key {k}, a later one (the mask must be causal: a prefill "
                "would see keys that decode cannot, and outputs would change with chunking and caching)")
    return None


class AttentionBackend:
    """Base class and the CPU default: torch SDPA for prefill, grouped batched matmuls for decode."""

    name: ClassVar[str] = "sdpa"
    api_version: ClassVar[int] = 1

    def __init__(self, **options):
        if options:
            raise ConfigError(f"attention backend {self.name!r} takes no options, got {sorted(options)}")

    def prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """q (T, H, D) over keys/values (S, H_kv, D) -> (T, H, D); mask.allowed (T, S), bias (H, T, S)."""
        q_t, k_t, v_t = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)  # (H, T, D), (Hkv, S, D)
        if mask.allowed is None:
            out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=q.shape[0] > 1, enable_gqa=True)
        else:
            attn_mask = mask.allowed if mask.bias is None else \
                mask.bias.to(q.dtype).masked_fill(~mask.allowed, float("-inf"))
            out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=attn_mask, enable_gqa=True)
        return out.transpose(0, 1)

    def decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """One query per sequence: q (B, H, D) over keys/values (B, S, H_kv, D); mask.allowed
        (B, 1, S), bias (B, H, 1, S). Plain batched matmuls with the query heads grouped per KV head: for a
        single query row this is several times faster on the CPU than SDPA with a mask (measured:
        2.5 ms -> 0.2 ms a layer)."""
        batch, num_heads, dim = q.shape
        num_kv = keys.shape[2]
        grouped = q.view(batch, num_kv, num_heads // num_kv, dim)  # (B, Hkv, G, D)
        scores = grouped @ keys.permute(0, 2, 3, 1) * dim ** -0.5  # (B, Hkv, G, S)
        if mask.bias is not None:
            scores = scores + mask.bias.view(batch, num_kv, num_heads // num_kv, -1).to(scores.dtype)
        probs = scores.masked_fill(~mask.allowed.unsqueeze(1), float("-inf")).softmax(dim=-1)
        return (probs @ values.transpose(1, 2)).reshape(batch, num_heads, dim)

    def scored(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention that also says how much each key received (for a variant that evicts by it):
        q (T, H, D) over keys/values (S, H_kv, D), mask.allowed (T, S) (never None here), bias
        (H, T, S) -> the output (T, H, D) and the fp32 softmax probabilities summed over heads
        (T, S). Explicit fp32 softmax, query heads grouped per KV head (no repeated keys)."""
        num_tokens, num_heads, dim = q.shape
        num_kv = keys.shape[1]
        grouped = q.float().view(num_tokens, num_kv, num_heads // num_kv, dim)  # (T, Hkv, G, D)
        scores = torch.einsum("tkgd,skd->kgts", grouped, keys.float()) * dim ** -0.5  # (Hkv, G, T, S)
        if mask.bias is not None:
            scores = scores + mask.bias.float().view(num_kv, num_heads // num_kv, num_tokens, -1)
        probs = scores.masked_fill(~mask.allowed, float("-inf")).softmax(dim=-1)
        out = torch.einsum("kgts,skd->tkgd", probs, values.float()).reshape(num_tokens, num_heads, dim)
        return out.to(q.dtype), probs.sum(dim=(0, 1))

    def paged_decode(self, q: torch.Tensor, k_pool, v_pool, block_tables: torch.Tensor,
                     mask: AttentionMask) -> torch.Tensor:
        """Decode straight from a paged pool (KVPool): block_tables (B, max_blocks). The default
        gathers whole blocks (contiguous block_size-token rows copy far faster than single tokens)
        and calls `decode`; a GPU kernel reads the pool in place instead."""
        keys = k_pool.gather(block_tables).flatten(1, 2).to(q.dtype)  # (B, S, Hkv, D)
        values = v_pool.gather(block_tables).flatten(1, 2).to(q.dtype)
        return self.decode(q, keys, values, mask)


    def reads_pool_in_place(self, dtype: torch.dtype, device: torch.device, k_pool, variant: AttentionVariant) -> bool:
        """True when the default backend hands a whole step to tandem's CPU paged attention
        (tandem.kernels.cpu): every row, prefill or decode, attends over its keys read in place
        from the pool, by one loop whatever the batch around it (batch-invariant: a token's result
        is the same in a prefill chunk, a decode step or a speculative verification). It needs the
        CPU kernels, fp32 in host memory, a dense pool, and a variant that is a key window
        (`key_window`: causal, sliding window). A subclass that overrides a method keeps its own."""
        from tandem.model.kv_pool import DenseKVPool

        cls = type(self)
        return (cls.prefill is AttentionBackend.prefill and cls.decode is AttentionBackend.decode
                and cls.paged_decode is AttentionBackend.paged_decode and dtype == torch.float32
                and device.type == "cpu" and variant.key_window() is not None and isinstance(k_pool, DenseKVPool)
                and k_pool.data.dtype == torch.float32 and cpu_ops() is not None)


class CausalAttention(AttentionVariant):
    """The default variant, under its registered name."""


DEFAULT_VARIANT = CausalAttention()
DEFAULT_BACKEND = AttentionBackend()

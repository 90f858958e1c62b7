"""Typed configuration of a model: the numbers every other component derives its shapes from.

One frozen dataclass per concern, validated on construction (STYLE.md rule 4). Loaders build a
`ModelConfig` from GGUF metadata or an HF `config.json`; nothing else reads those formats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.errors import ConfigError

ROPE_SCALING_KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary position frequencies are stretched past the trained context.

    kind: "none"; "linear" (position interpolation, Chen et al. 2023); "ntk" (NTK-aware base
    change, static); "dynamic" (HF's dynamic NTK, computed statically for the extended context as
    vLLM does, so cached keys stay valid); "yarn" (Peng et al. 2023); "llama3" (Meta's
    wavelength-banded scaling).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0  # yarn: rotations above which dimensions are extrapolated
    beta_slow: float = 1.0  # yarn: rotations below which dimensions are interpolated
    attention_factor: float | None = None  # yarn: scale on cos/sin; None = 0.1*ln(factor)+1
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALING_KINDS:
            raise ConfigError(f"unknown RoPE scaling {self.kind!r}; allowed: {', '.join(ROPE_SCALING_KINDS)}")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ConfigError(f"RoPE scaling factor must be a finite number >= 1, got {self.factor}")
        if self.kind in ("yarn", "llama3") and not self.original_max_position:
            raise ConfigError(f"RoPE scaling {self.kind!r} needs original_max_position")


QK_NORMS = ("none", "full", "head")


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts feed-forward layers (Shazeer et al. 2017; Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE). Each token's router logits go through a softmax over all experts; its
    top_k experts run and their outputs are summed, weighted by those probabilities (renormalised
    to sum to 1 when normalize_top_k). A shared expert (Qwen2-MoE) is a dense SwiGLU every token
    passes through, scaled by sigmoid(its gate)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    normalize_top_k: bool = True
    shared_expert_intermediate_size: int = 0  # 0: none
    sparse_layers: tuple[int, ...] | None = None  # which layers are sparse; None: all of them

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "expert_intermediate_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MoE config {key} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"MoE top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if not isinstance(self.shared_expert_intermediate_size, int) or self.shared_expert_intermediate_size < 0:
            raise ConfigError("MoE shared_expert_intermediate_size must be a non-negative integer")

    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers is None or layer in self.sparse_layers


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (Llama family)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None  # Mistral-style: each token sees the last W positions
    moe: MoEConfig | None = None  # sparse MoE feed-forward layers (None: dense SwiGLU everywhere)
    qk_norm: str = "none"  # RMSNorm on queries and keys before RoPE: "full" (OLMoE), "head" (Qwen3)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]
    name: str = ""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ConfigError("rope_theta and rms_norm_eps must be positive")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"unknown qk_norm {self.qk_norm!r}; allowed: {', '.join(QK_NORMS)}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"clip_qkv must be positive or None, got {self.clip_qkv!r}")

    def attention_variant(self) -> tuple[str, dict]:
        """The attention variant the model was trained with (name, options): what the engine uses
        unless a server flag overrides it."""
        if self.sliding_window and self.sliding_window < self.max_position:
            return "sliding_window", {"window": self.sliding_window}
        return "causal", {}

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers: 2*layers*kv_heads*head_dim*bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        dense = 3 * d * self.intermediate_size
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        total = self.num_layers * (attn + 2 * d) + embed + d
        for layer in range(self.num_layers):
            m = self.moe
            if m is not None and m.is_sparse(layer):
                shared = 3 * d * m.shared_expert_intermediate_size + (d if m.shared_expert_intermediate_size else 0)
                total += m.num_experts * (3 * d * m.expert_intermediate_size + d) + shared
            else:
                total += dense
        return total

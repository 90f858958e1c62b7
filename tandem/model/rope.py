"""Rotary position embeddings (Su et al., RoFormer) with linear, NTK, YaRN and Llama-3 scaling.

Frequencies follow HF transformers' `rope_utils` so that HF checkpoints and tandem agree exactly;
dynamic NTK is made static (vLLM's choice) so that keys already in the KV cache stay valid.
Two layouts of the rotated pairs exist: "neox" (pairs are (i, i + D/2), HF's layout, tandem's
internal one) and "interleaved" (pairs are (2i, 2i+1), GPT-J's and llama.cpp's). GGUF files store
Q/K rows permuted for the interleaved layout; the loader undoes that (`unpermute_qk`).
"""
from __future__ import annotations

import math

import torch

from tandem.config import RopeScaling


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    low = math.floor(_yarn_correction_dim(s.beta_fast, dim, base, s.original_max_position))
    high = math.ceil(_yarn_correction_dim(s.beta_slow, dim, base, s.original_max_position))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    return (inv_freq / s.factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old_len = s.original_max_position
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling,
                     max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) float32 and the attention factor that scales cos and sin."""
    base = theta
    if scaling.kind == "ntk":
        base = theta * scaling.factor ** (head_dim / (head_dim - 2))
    elif scaling.kind == "dynamic":
        original = scaling.original_max_position or max_position
        max_len = original * scaling.factor
        base = theta * ((scaling.factor * max_len / original) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    attention_factor = 1.0
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, head_dim, base, scaling)
        attention_factor = scaling.attention_factor
        if attention_factor is None:
            attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    elif scaling.kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Caches cos/sin for positions [0, max_position) and rotates q, k (B, T, H, D) in the neox layout."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, max_position: int,
                 freq_divisors: torch.Tensor | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, max_position)
        if freq_divisors is not None:  # GGUF `rope_freqs.weight` (Llama-3 files store scaling this way)
            inv_freq = inv_freq / freq_divisors.float()
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # (P, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (P, D): neox layout repeats each frequency
        self.register_buffer("cos", angles.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * attention_factor, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions (B, T), shaped (B, T, 1, D) to broadcast over heads."""
        return self.cos[positions].unsqueeze(-2).to(dtype), self.sin[positions].unsqueeze(-2).to(dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x (..., D) by angles whose cos/sin are given in the neox layout (..., D)."""
    if not interleaved:
        return x * cos + rotate_half(x) * sin
    half = x.shape[-1] // 2
    cos_i = cos[..., :half].repeat_interleave(2, dim=-1)
    sin_i = sin[..., :half].repeat_interleave(2, dim=-1)
    x_pairs = x.unflatten(-1, (half, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos_i + rotated * sin_i


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation: interleaved pairs -> neox halves.

    weight is (num_heads * head_dim, in_features) as stored in GGUF (after dequantization).
    """
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The permutation llama.cpp's converter applies (neox halves -> interleaved pairs)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)

"""RoPE frequencies and scaling against transformers' rope_utils, and the GGUF Q/K permutation."""
from __future__ import annotations

import math

import pytest
import torch

from tandem.config import RopeScaling
from tandem.errors import ConfigError
from tandem.model.rope import apply_rotary, permute_qk, rope_frequencies, rotate_half, unpermute_qk

HEAD_DIM, THETA = 64, 10000.0
SCALINGS = [
    ("linear", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 1024}),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0, "beta_slow": 2.0}),
    ("llama3", {"factor": 8.0, "original_max_position_embeddings": 1024, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}),
]


@pytest.mark.parametrize("kind,params", SCALINGS)
def test_scaling_matches_transformers(kind, params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": kind, "rope_theta": THETA, **params})
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    ours = RopeScaling(kind=kind, factor=params["factor"],
                       original_max_position=params.get("original_max_position_embeddings"),
                       **{k: v for k, v in params.items() if k in ("beta_fast", "beta_slow", "low_freq_factor",
                                                                 "high_freq_factor")})
    inv_freq, factor = rope_frequencies(HEAD_DIM, THETA, ours, 4096)
    torch.testing.assert_close(inv_freq, expected_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)


def test_ntk_changes_base_only():
    inv_freq, factor = rope_frequencies(HEAD_DIM, THETA, RopeScaling(kind="ntk", factor=4.0), 4096)
    base = THETA * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2))
    expected = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    torch.testing.assert_close(inv_freq, expected)
    assert factor == 1.0
    assert inv_freq[0] == 1.0  # the highest frequency is never stretched


def test_unscaled_frequencies():
    inv_freq, factor = rope_frequencies(HEAD_DIM, THETA, RopeScaling(), 4096)
    assert inv_freq[1].item() == pytest.approx(THETA ** (-2 / HEAD_DIM))
    assert factor == 1.0


@pytest.mark.parametrize("bad", [dict(kind="bogus"), dict(kind="linear", factor=0.5),
                                 dict(kind="yarn", factor=2.0), dict(kind="linear", factor=math.nan)])
def test_bad_scaling_is_rejected(bad):
    with pytest.raises(ConfigError):
        RopeScaling(**bad)


def test_permutation_roundtrip_and_equivalence():
    """Interleaved RoPE on converter-permuted weights == neox RoPE on the original weights."""
    torch.manual_seed(0)
    num_heads, dim, d_in = 3, 8, 5
    weight = torch.randn(num_heads * dim, d_in)
    permuted = permute_qk(weight, num_heads)
    assert not torch.equal(permuted, weight)
    torch.testing.assert_close(unpermute_qk(permuted, num_heads), weight, rtol=0, atol=0)

    x = torch.randn(d_in)
    angles = torch.rand(dim // 2) * 6
    cos, sin = torch.cat((angles, angles)).cos(), torch.cat((angles, angles)).sin()
    neox = apply_rotary((weight @ x).view(num_heads, dim), cos, sin)
    interleaved = apply_rotary((permuted @ x).view(num_heads, dim), cos, sin, interleaved=True)
    # the interleaved result, read in the permuted order, is the neox result
    torch.testing.assert_close(unpermute_qk(interleaved.reshape(-1, 1), num_heads).view(num_heads, dim), neox)


def test_rotation_preserves_norm_and_position_zero_is_identity():
    x = torch.randn(2, 3, 5, HEAD_DIM)
    angles = torch.rand(5, HEAD_DIM // 2) * 10
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x, torch.ones(HEAD_DIM), torch.zeros(HEAD_DIM)), x)
    assert torch.equal(rotate_half(rotate_half(x)), -x)

"""rotary_embedding: the Triton kernel (interpreted on the CPU) against its torch reference, and
the reference against tandem.model.rope (RotaryEmbedding's tables, apply_rotary in both layouts),
including partial rotary, GQA head counts, strided q/k views of one qkv tensor, and the layouts'
relation through the GGUF Q/K permutation."""
from __future__ import annotations

import pytest
import torch

from tandem.config import RopeScaling
from tandem.kernels.rotary_embedding import rotary_embedding, rotary_embedding_reference, rotary_embedding_triton
from tandem.model.rope import RotaryEmbedding, apply_rotary, permute_qk

# both compute in fp32 and round once: fp32 differs by an fp32 rounding, halves by one output
# rounding (the interpreter truncates to bf16: one more ulp, within bf16's rtol)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 1.6e-2)]
MAX_POSITION = 64


def _tables(head_dim: int, rotary_dim: int | None = None):
    """cos, sin (P, D_rot / 2) from tandem's RotaryEmbedding (YaRN: a non-trivial attention factor)."""
    rotary_dim = rotary_dim or head_dim
    rope = RotaryEmbedding(rotary_dim, 10000.0, RopeScaling(kind="yarn", factor=2.0, original_max_position=32),
                           MAX_POSITION)
    return rope, rope.cos[:, :rotary_dim // 2].contiguous(), rope.sin[:, :rotary_dim // 2].contiguous()


def _qk(num_tokens, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen)
    return q.to(device), k.to(device), positions.to(device)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("num_tokens, heads, kv_heads, head_dim, rotary_dim",
                         [(1, 4, 4, 16, 16), (7, 6, 2, 64, 64), (5, 3, 1, 48, 48), (9, 4, 2, 80, 32)],
                         ids=["mha", "gqa", "mqa-d48", "partial-80-32"])
def test_kernel_matches_the_reference(num_tokens, heads, kv_heads, head_dim, rotary_dim, interleaved, dtype, atol, rtol,
                                      device):
    _, cos, sin = _tables(head_dim, rotary_dim)
    cos, sin = cos.to(device), sin.to(device)
    q, k, positions = _qk(num_tokens, heads, kv_heads, head_dim, dtype, device)
    expected_q, expected_k = rotary_embedding_reference(q.clone(), k.clone(), positions, cos, sin,
                                                        interleaved=interleaved)
    q_in, k_in = q.clone(), k.clone()
    out_q, out_k = rotary_embedding_triton(q_in, k_in, positions.int(), cos, sin, interleaved=interleaved)
    assert out_q is q_in and out_k is k_in  # in place, returned
    torch.testing.assert_close(out_q, expected_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_k, expected_k, atol=atol, rtol=rtol)
    assert torch.equal(out_q[..., rotary_dim:], q[..., rotary_dim:])  # partial rotary: the rest untouched


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_strided_views_of_a_fused_qkv_rotate_in_place(interleaved, device):
    """tandem's attention slices q and k out of one (N, H + 2 H_kv, D) projection."""
    heads, kv_heads, dim = 4, 2, 32
    _, cos, sin = _tables(dim)
    cos, sin = cos.to(device), sin.to(device)
    qkv = torch.randn(6, heads + 2 * kv_heads, dim, generator=torch.Generator().manual_seed(3)).to(device)
    positions = torch.arange(10, 16, device=device)
    expected = qkv.clone()
    rotary_embedding_reference(expected[:, :heads], expected[:, heads:heads + kv_heads], positions, cos, sin,
                               interleaved=interleaved)
    rotary_embedding_triton(qkv[:, :heads], qkv[:, heads:heads + kv_heads], positions, cos, sin,
                            interleaved=interleaved)
    torch.testing.assert_close(qkv, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, heads + kv_heads:], expected[:, heads + kv_heads:])  # v untouched


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_reference_matches_tandems_rope(interleaved):
    """RotaryEmbedding.tables + apply_rotary (the model's path) give the same rotation in fp32."""
    rope, cos, sin = _tables(32)
    q, k, positions = _qk(8, 4, 2, 32, torch.float32, "cpu")
    full_cos, full_sin = rope.tables(positions.unsqueeze(0), torch.float32)  # (1, N, 1, D)
    expected_q = apply_rotary(q.unsqueeze(0), full_cos, full_sin, interleaved=interleaved)[0]
    expected_k = apply_rotary(k.unsqueeze(0), full_cos, full_sin, interleaved=interleaved)[0]
    out_q, out_k = rotary_embedding_reference(q.clone(), k.clone(), positions, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(out_q, expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_k, expected_k, atol=1e-6, rtol=1e-6)


def test_interleaved_layout_is_neox_on_gguf_permuted_rows(device):
    """llama.cpp permutes Q/K rows so that interleaved RoPE on them equals neox RoPE on HF's rows."""
    _, cos, sin = _tables(16)
    cos, sin = cos.to(device), sin.to(device)
    q, k, positions = _qk(5, 2, 2, 16, torch.float32, device)
    neox_q, _ = rotary_embedding_triton(q.clone(), k.clone(), positions, cos, sin)
    permute = lambda t: permute_qk(t.reshape(-1, 1), t.shape[0]).view_as(t)  # noqa: E731  one token (H, D)
    gguf_q = torch.stack([permute(row) for row in q])
    inter_q, _ = rotary_embedding_triton(gguf_q, k.clone(), positions, cos, sin, interleaved=True)
    torch.testing.assert_close(inter_q, torch.stack([permute(row) for row in neox_q]), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors(device):
    _, cos, sin = _tables(16)
    cos, sin = cos.to(device), sin.to(device)
    q, k, positions = _qk(3, 2, 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="q and k must be"):
        rotary_embedding_triton(q, k[:2], positions, cos, sin)
    with pytest.raises(ValueError, match="positions must be"):
        rotary_embedding_triton(q, k, positions.float(), cos, sin)
    with pytest.raises(ValueError, match="rotary dimension"):
        rotary_embedding_triton(q[..., :8], k[..., :8], positions, cos, sin)
    with pytest.raises(ValueError, match="contiguous along their last dimension"):
        rotary_embedding_triton(q.transpose(0, 2).contiguous().transpose(0, 2), k, positions, cos, sin)


def test_dispatch_takes_the_reference_on_the_cpu(monkeypatch):
    import tandem.kernels.rotary_embedding as module

    monkeypatch.setattr(module, "rotary_embedding_triton", lambda *a, **k: pytest.fail("the kernel ran on CPU"))
    _, cos, sin = _tables(16)
    q, k, positions = _qk(3, 2, 1, 16, torch.float32, "cpu")
    expected = rotary_embedding_reference(q.clone(), k.clone(), positions, cos, sin)
    torch.testing.assert_close(rotary_embedding(q, k, positions, cos, sin), expected)

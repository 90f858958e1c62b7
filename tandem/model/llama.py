"""The Llama-family decoder in plain torch (Touvron et al. 2023), shaped like nanoGPT's model.py.

Pre-norm RMSNorm, RoPE, grouped-query attention (MHA when H_kv == H, MQA when H_kv == 1), SwiGLU MLP,
final norm, LM head (optionally tied to the embeddings). Parameter names are HF's, so HF
checkpoints load as they are and GGUF tensors are renamed to them (tandem.model.gguf_file).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import ModelConfig
from tandem.model.attention import AttentionContext
from tandem.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype (as HF and llama.cpp do).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                attn: AttentionContext | None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if attn is None or attn.variant.rotary:  # ALiBi-style variants replace RoPE
            q, k = rope(q, k, positions)
        if attn is None:  # no cache: causal attention within each row
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=seq_len > 1, enable_gqa=True).transpose(1, 2)
        else:  # the context holds the KV cache and knows where each sequence of the flat batch starts
            out = attn.attend(self.layer_idx, q[0], k[0], v[0]).unsqueeze(0)
        return self.o_proj(out.reshape(batch, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, rope, attn):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (B, T), positions (B, T), attn) -> final hidden states (B, T, d).

    Without an attention context each row is one causal sequence (no cache). With one, the batch
    is a single flat row (1, N) of tokens from many sequences; the context (a contiguous KVCache
    or the engine's paged one) stores their keys/values and computes attention per sequence.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_rope()

    def reset_rope(self, freq_divisors: torch.Tensor | None = None) -> None:
        """(Re)build the cos/sin tables on the CPU; the loader calls it after filling meta weights."""
        c = self.config
        with torch.device("cpu"):
            self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position, freq_divisors)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionContext | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, self.rope, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head, logits in fp32: (..., d) -> (..., vocab). The head may be a quantized module."""
        return self.lm_head(hidden).float()

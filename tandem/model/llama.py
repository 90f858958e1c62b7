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
from tandem.kernels.cpu import ops as cpu_ops
from tandem.model.attention import AttentionContext
from tandem.model.moe import SparseMoE
from tandem.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype (as HF and llama.cpp do).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.device.type == "cpu" and (kernels := cpu_ops()) is not None:  # one pass, one call
                return kernels.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps).view(x.shape)
            return F.rms_norm(x, (x.shape[-1],), weight=self.weight, eps=self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _fuse_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the concatenated outputs of parts (same input): one matmul, not several."""
    bias = parts[0].bias is not None
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=bias,
                      device=parts[0].weight.device, dtype=parts[0].weight.dtype)
    fused.weight.data = torch.cat([p.weight.data for p in parts])
    if bias:
        fused.bias.data = torch.cat([p.bias.data for p in parts])
    return fused.requires_grad_(False)


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
        self.qkv_proj: nn.Linear | None = None
        # OLMoE normalises the whole q and k projections, Qwen3 each head; both before RoPE
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        if config.qk_norm != "none":
            full = config.qk_norm == "full"
            self.q_norm = RMSNorm(self.num_heads * self.head_dim if full else self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim if full else self.head_dim, config.rms_norm_eps)

    def fuse(self) -> None:
        """Replace q/k/v_proj by one qkv_proj (vLLM's QKVParallelLinear idea): at batch 1 the
        per-call overhead of three small matmuls is a measurable part of a decode step."""
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionContext | None) -> torch.Tensor:
        """rotary: the (cos, sin) tables (B, T, 1, D) of this forward's positions, looked up once."""
        batch, seq_len, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(batch, seq_len, heads + 2 * kv_heads, dim)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]  # (B, T, H + Hkv, D), (B, T, Hkv, D)
        else:
            qk = torch.cat([self.q_proj(x).view(batch, seq_len, heads, dim),
                            self.k_proj(x).view(batch, seq_len, kv_heads, dim)], dim=2)
            v = self.v_proj(x).view(batch, seq_len, kv_heads, dim)
        if self.qk_norm != "none" or self.clip_qkv:
            qk, v = self._norm_and_clip(qk, v)
        if attn is None or attn.variant.rotary:  # ALiBi-style variants replace RoPE
            qk = apply_rotary(qk, *rotary)  # queries and keys in one pass
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        if attn is None:  # no cache: causal attention within each row
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=seq_len > 1, enable_gqa=True).transpose(1, 2)
        else:  # the context holds the KV cache and knows where each sequence of the flat batch starts
            out = attn.attend(self.layer_idx, q[0], k[0], v[0]).unsqueeze(0)
        return self.o_proj(out.reshape(batch, seq_len, -1))


    def _norm_and_clip(self, qk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.num_heads
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        if self.qk_norm == "full":
            q = self.q_norm(q.flatten(2)).view_as(q)
            k = self.k_norm(k.flatten(2)).view_as(k)
        elif self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        qk = torch.cat([q, k], dim=2)
        if self.clip_qkv:
            qk, v = qk.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
        return qk, v


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe
        self.mlp = SparseMoE(config, MLP) if moe is not None and moe.is_sparse(layer_idx) \
            else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rotary, attn):
        x = x + self.self_attn(self.input_layernorm(x), rotary, attn)
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

    fused_layers = True  # False: every step runs the eager layers (the fused layer's reference)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_rope()

    def fuse_projections(self) -> None:
        """Merge each layer's q/k/v and gate/up projections into one matmul each (after loading:
        the checkpoint's names are the unfused ones). Quantizers then see the fused weights."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def reset_rope(self, freq_divisors: torch.Tensor | None = None) -> None:
        """(Re)build the cos/sin tables on the CPU; the loader calls it after filling meta weights."""
        c = self.config
        with torch.device("cpu"):
            self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position, freq_divisors)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionContext | None = None, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: a pipeline stage's input (the previous stage's output) instead of the
        embedding of input_ids. A stage without the final norm (not the last) returns its last
        layer's output unnormalised: the residual stream the next stage continues."""
        x = self.model.embed_tokens(input_ids) if hidden_states is None else hidden_states
        fused = self._fused_layers(x, attn)
        if fused is not None:
            x = fused(positions)
        else:
            rotary = self.rope.tables(positions, x.dtype)
            for layer in self.model.layers:
                x = layer(x, rotary, attn)
        return x if self.model.norm is None else self.model.norm(x)

    def _fused_layers(self, x: torch.Tensor, attn):
        """A function running this step's layers with the CPU extension's fused layer (one C++ call
        a layer; tandem.kernels.cpu), or None where the step does not qualify: fp32 on the CPU,
        attention the backend computes over the pools in one call (PagedAttention.flat_rows), RoPE,
        and every projection kept in GGML blocks without a bias. Prefill chunks and decode tokens
        alike, with the step's LoRA adapters if any (their low-rank updates inside the layer, tokens
        grouped by adapter once a step: LoRAContext.fused_args). The eager layers are its reference (the
        same kernels, op for op; the LoRA updates in another summation order)."""
        flat_rows = getattr(attn, "flat_rows", None)
        if not self.fused_layers or flat_rows is None or not attn.variant.rotary or x.dtype != torch.float32:
            return None
        rows = flat_rows(x.dtype, x.device)
        layers = self._ggml_layer_args()
        if rows is None or layers is None:
            return None
        kernels, c, slots = cpu_ops(), self.config, attn.meta.slots
        lora = getattr(self, "lora_context", None)
        step_lora = lora.fused_args if lora is not None else []  # empty unless a token of the step runs an adapter
        adapters = self._lora_layer_args() if step_lora else [[]] * len(layers)

        def run(positions: torch.Tensor) -> torch.Tensor:
            h = x[0]
            cos, sin = self.rope.cos[positions[0]], self.rope.sin[positions[0]]
            for layer, args, slot_weights in zip(self.model.layers, layers, adapters):
                i = layer.self_attn.layer_idx  # the pools are the whole model's layers (a stage holds some)
                h = kernels.fused_layer(h, *args, cos, sin, attn.k_pools[i].data, attn.v_pools[i].data, slots,
                                         *rows.args(), c.num_heads, c.num_kv_heads,
                                         step_lora + slot_weights)
            return h.unsqueeze(0)
        return run

    def _lora_layer_args(self) -> list[list[torch.Tensor]]:
        """Per layer, the LoRA slots' (A, B^T) of qkv, o, gate_up and down (tandem.model.lora's
        buffers themselves: adapters written into a slot later are seen)."""
        if not hasattr(self, "_lora_args"):
            self._lora_args = []
            for layer in self.model.layers:
                projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                               layer.mlp.down_proj)
                self._lora_args.append([t for p in projections for t in (p.lora_a, p.lora_bt)])
        return self._lora_args

    def _ggml_layer_args(self) -> list[tuple] | None:
        """Per layer, (norm1, norm2, eps, qkv, o, gate_up, down) for the fused layer, or None."""
        c = self.config
        if c.moe is not None or c.qk_norm != "none" or c.clip_qkv:  # the fused layer is the plain Llama one
            return None
        if not hasattr(self, "_ggml_args"):
            from tandem.kernels.ggml_cpu import GGMLLinear

            def blocks(module) -> list[torch.Tensor] | None:
                module = getattr(module, "base", module)  # a LoRAProjection's base weight, for steps without adapters
                if not isinstance(module, GGMLLinear) or module.bias is not None or module.padded:
                    return None
                return module.packed()

            args = []
            for layer in self.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                weights = [blocks(attn.qkv_proj), blocks(attn.o_proj), blocks(mlp.gate_up_proj), blocks(mlp.down_proj)]
                norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                if None in weights or any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms) \
                        or cpu_ops() is None:
                    args = None
                    break
                args.append((*norms, layer.input_layernorm.eps, *weights))
            self._ggml_args = args
        return self._ggml_args

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head, logits in fp32: (..., d) -> (..., vocab). The head may be a quantized module."""
        return self.lm_head(hidden).float()

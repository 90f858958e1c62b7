"""A minimal SmolLM2-135M (Llama) in plain torch, with a pluggable matmul kernel per projection.

Used by layer.py (per-layer cost, eager vs torch.compile), chain.py (whole decode step) and
accuracy.py (agreement with fp32). Projections are fused as tandem fuses them (qkv 960x576,
gate_up 3072x576); weights come from the GGUF's own Q4_1 / Q8_0 codes (common.load_model_weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import Q4, build_kernel

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER = 9, 3, 64, 576, 1536


def fuse(ws):
    return Q4(torch.cat([w.q for w in ws]), torch.cat([w.d for w in ws]), torch.cat([w.m for w in ws]))


def make_linear(kernel: str, q, act_dtype):
    """fn(x (M, K) act_dtype) -> (M, N) act_dtype. Casts around the kernel when its input dtype
    differs from the activation dtype (as tandem's Int4Linear does today)."""
    if kernel == "noop":  # the matmul removed: returns a preallocated buffer of the right shape
        bufs = {}
        n = q.q.shape[0]

        def fn(x):
            m = x.shape[0]
            if m not in bufs:
                bufs[m] = torch.zeros(m, n, dtype=act_dtype)
            return bufs[m]
        return fn
    fn, in_dtype = build_kernel(kernel, q.dequant(), q)
    if in_dtype == act_dtype:
        return fn
    if in_dtype == torch.int8:
        raise ValueError("int_mm_kernel is a timing-only kernel")
    return lambda x: fn(x.to(in_dtype)).to(act_dtype)


class Mini:
    """kernels: {'qkv','o','gate_up','down','head': kernel name}; act_dtype: the residual stream's."""

    def __init__(self, model, kernels: dict, act_dtype=torch.float32, layers=None, max_pos=4096):
        self.act_dtype = act_dtype
        L = model["layers"] if layers is None else model["layers"][:layers]
        self.layers = []
        for l in L:
            self.layers.append(dict(
                in_norm=l["in_norm"].to(act_dtype), post_norm=l["post_norm"].to(act_dtype),
                qkv=make_linear(kernels["qkv"], fuse([l["q"], l["k"], l["v"]]), act_dtype),
                o=make_linear(kernels["o"], l["o"], act_dtype),
                gate_up=make_linear(kernels["gate_up"], fuse([l["gate"], l["up"]]), act_dtype),
                down=make_linear(kernels["down"], l["down"], act_dtype),
            ))
        self.norm = model["norm"].to(act_dtype)
        self.head = make_linear(kernels["head"], model["embed"], act_dtype)
        self.embed = model["embed"].dequant().to(act_dtype)
        cfg = model["config"]
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        ang = torch.outer(torch.arange(max_pos).float(), inv)
        ang = torch.cat([ang, ang], -1)
        self.cos, self.sin = ang.cos().to(act_dtype), ang.sin().to(act_dtype)
        self.eps = cfg.rms_norm_eps

    # -- pieces
    def rms(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), weight=w, eps=self.eps)

    @staticmethod
    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    # -- decode: M sequences, one new token each, all at position `pos`, caches (M, Hkv, C, D)
    def layer_decode(self, i, x, cos, sin, kc, vc, pos):
        l = self.layers[i]
        m = x.shape[0]
        qkv = l["qkv"](self.rms(x, l["in_norm"])).view(m, HEADS + 2 * KV_HEADS, HEAD_DIM)
        qk = self.rope(qkv[:, :HEADS + KV_HEADS], cos, sin)
        q, k, v = qk[:, :HEADS], qk[:, HEADS:], qkv[:, HEADS + KV_HEADS:]
        kc[:, :, pos] = k
        vc[:, :, pos] = v
        att = F.scaled_dot_product_attention(q.unsqueeze(2), kc[:, :, :pos + 1], vc[:, :, :pos + 1],
                                             enable_gqa=True)  # (M, H, 1, D)
        x = x + l["o"](att.reshape(m, HEADS * HEAD_DIM))
        gate, up = l["gate_up"](self.rms(x, l["post_norm"])).chunk(2, dim=-1)
        return x + l["down"](F.silu(gate) * up)

    def new_caches(self, m, ctx):
        mk = lambda: torch.randn(m, KV_HEADS, ctx + 1, HEAD_DIM, dtype=self.act_dtype) * 0.5  # noqa: E731
        return [(mk(), mk()) for _ in self.layers]

    def decode_step(self, x, caches, pos):
        """x (M, d) embeddings -> next token ids (M,) (greedy; logits in fp32)."""
        cos, sin = self.cos[pos].view(1, 1, -1), self.sin[pos].view(1, 1, -1)
        for i in range(len(self.layers)):
            x = self.layer_decode(i, x, cos, sin, *caches[i], pos)
        logits = self.head(self.rms(x, self.norm))
        return logits.argmax(-1)

    # -- prefill without cache, one sequence (T tokens): for accuracy checks
    def rope_tables(self, T):
        return self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1)

    def layer_full(self, i, x, cos, sin):
        l = self.layers[i]
        T = x.shape[0]
        qkv = l["qkv"](self.rms(x, l["in_norm"])).view(T, HEADS + 2 * KV_HEADS, HEAD_DIM)
        qk = self.rope(qkv[:, :HEADS + KV_HEADS], cos, sin)
        q, k, v = qk[:, :HEADS], qk[:, HEADS:], qkv[:, HEADS + KV_HEADS:]
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             is_causal=True, enable_gqa=True).transpose(0, 1)
        x = x + l["o"](att.reshape(T, HEADS * HEAD_DIM))
        gate, up = l["gate_up"](self.rms(x, l["post_norm"])).chunk(2, dim=-1)
        return x + l["down"](F.silu(gate) * up)

    def forward_full(self, ids, capture=None):
        x = self.embed[ids]
        cos, sin = self.rope_tables(ids.shape[0])
        for i in range(len(self.layers)):
            if capture is not None:
                capture.append(x)
            x = self.layer_full(i, x, cos, sin)
        if capture is not None:
            capture.append(x)
        return self.head(self.rms(x, self.norm)).float()


def uniform(kernel, head=None):
    return {"qkv": kernel, "o": kernel, "gate_up": kernel, "down": kernel, "head": head or kernel}

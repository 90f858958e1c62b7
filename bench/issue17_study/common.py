"""Shared helpers for the issue-17 kernel study: real SmolLM2-135M weights (raw Q4_1/Q8_0 codes
and their fp32 dequantization), one builder per matmul kernel, and a timer.

Run from the repository root with .venv/bin/python (torch 2.13 CPU). Nothing here writes outside bench/issue17_study.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)

GGUF = None  # set below, once tandem is importable: the default model's file
GROUP = 32


# ------------------------------------------------------------------ real weights, raw codes

@dataclass
class Q4:
    """One Q4_1 weight (N, K): w = d * q + m per group of 32 along K, q in [0, 15]."""
    q: torch.Tensor  # (N, K) uint8 codes
    d: torch.Tensor  # (N, K/32) fp32 (exact fp16 values)
    m: torch.Tensor  # (N, K/32) fp32

    def dequant(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.q.view(n, k // GROUP, GROUP).float()
        return (g * self.d.unsqueeze(-1) + self.m.unsqueeze(-1)).view(n, k)


@dataclass
class Q8:
    """One Q8_0 weight (N, K): w = d * q per group of 32, q int8."""
    q: torch.Tensor  # (N, K) int8
    d: torch.Tensor  # (N, K/32) fp32

    def dequant(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.view(n, k // GROUP, GROUP).float() * self.d.unsqueeze(-1)).view(n, k)


def _parse_q4_1(raw: np.ndarray, n: int, k: int) -> Q4:
    blocks = np.ascontiguousarray(raw).reshape(n * k // GROUP, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n, k // GROUP)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(n, k // GROUP)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(n, k)  # elements 0..15 low, 16..31 high
    return Q4(torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(m))


def _parse_q8_0(raw: np.ndarray, n: int, k: int) -> Q8:
    blocks = np.ascontiguousarray(raw).reshape(n * k // GROUP, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n, k // GROUP)
    q = blocks[:, 2:34].copy().view(np.int8).reshape(n, k)
    return Q8(torch.from_numpy(q), torch.from_numpy(d))


def _permute_rows(w, perm):
    if isinstance(w, Q4):
        return Q4(w.q[perm].contiguous(), w.d[perm].contiguous(), w.m[perm].contiguous())
    return w


def load_model_weights():
    """{'layers': [dict(q, k, v, o, gate, up, down: Q4, in_norm, post_norm: fp32)], 'embed': Q8,
    'norm': fp32, 'config': ModelConfig}. Q/K rows un-permuted to the neox layout as tandem does."""
    import gguf
    from tandem.model.gguf_file import GGUFFile
    from tandem.model.rope import unpermute_qk

    from tandem.model.registry import resolve_model_path

    g = GGUFFile(GGUF or resolve_model_path("smollm2-135m"))
    cfg = g.config()
    names = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
             "ffn_up": "up", "ffn_down": "down", "attn_norm": "in_norm", "ffn_norm": "post_norm"}
    layers = [dict() for _ in range(cfg.num_layers)]
    out = {"layers": layers, "config": cfg}
    for name, t in g.tensors.items():
        k, n = [int(x) for x in t.shape][:2] if len(t.shape) == 2 else (int(t.shape[0]), 1)
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            w = _parse_q4_1(t.data, n, k)
        elif t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            w = _parse_q8_0(t.data, n, k)
        else:
            w = g.load_tensor(name)
        if name == "token_embd.weight":
            out["embed"] = w
            continue
        if name == "output_norm.weight":
            out["norm"] = w
            continue
        parts = name.split(".")
        li, key = int(parts[1]), names.get(parts[2])
        if key is None:
            continue
        if key in ("q", "k"):
            heads = cfg.num_heads if key == "q" else cfg.num_kv_heads
            perm = unpermute_qk(torch.arange(n), heads)
            w = _permute_rows(w, perm)
        layers[li][key] = w
    return out


# ------------------------------------------------------------------ activation quantization

def quant_per_token_sym(x: torch.Tensor):
    """x (M, K) float -> (int8 (M, K), scale (M, 1) fp32), symmetric per row."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def requant_int8_per_channel(w: torch.Tensor):
    """w (N, K) fp32 -> int8 (N, K) and fp32 scales (N,), symmetric per output channel."""
    scale = w.abs().amax(dim=1).clamp(min=1e-10) / 127
    q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


# ------------------------------------------------------------------ kernels
# Each builder takes (w_fp32 (N, K), q4: Q4 | None) and returns fn(x fp32 (M, K)) -> (M, N) fp32,
# or (fn, x_dtype): fn takes x already in x_dtype (the "kernel alone" timing; the cast is timed
# separately). Builders that cannot work raise.

def k_fp32(w, q4=None):
    w = w.contiguous()
    return lambda x: F.linear(x, w)


def k_bf16(w, q4=None):
    wb = w.to(torch.bfloat16).contiguous()
    return (lambda x: F.linear(x, wb)), torch.bfloat16


def k_fp16_linear(w, q4=None):
    wh = w.to(torch.float16).contiguous()
    return (lambda x: F.linear(x, wh)), torch.float16


def _int4pack_from(q4: Q4 | None, w: torch.Tensor, dtype):
    """Pack for _weight_int4pack_mm_for_cpu: w = (q - 8) * scale + zero. From the Q4_1 codes when
    given (zero = m + 8 d: the same grid, only the scale/zero dtype rounds), else re-quantized."""
    if isinstance(q4, Q4):
        q, scales, zeros = q4.q, q4.d, q4.m + 8 * q4.d
    else:
        from tandem.model.quantization import int4_codes
        q, scales, zeros = int4_codes(w, GROUP)
        scales, zeros = scales.float(), zeros.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (K/g, N, 2)
    return packed, sz


def k_int4pack(dtype):
    def build(w, q4=None):
        packed, sz = _int4pack_from(q4, w, dtype)
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)), dtype
    return build


def k_int8pack_bf16(w, q4=None):
    q, s = requant_int8_per_channel(w)
    sb = s.to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, sb)), torch.bfloat16


def k_dyn_quant_4bit(w, q4=None):
    """aten._dyn_quant_matmul_4bit: symmetric int4 groups of 32 (w = (q - 8) * s), int8 dynamic
    activations inside the op (KleidiAI on Arm; a reference path elsewhere). Q4_1's min cannot be
    represented, so the weight is re-quantized symmetric (not lossless)."""
    n, k = w.shape
    g = w.view(n, k // GROUP, GROUP)
    s = (g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 7)
    q = (g / s + 8.5).to(torch.int8).clamp(max=15).view(n, k)
    packed_u8 = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8).contiguous()
    scales = s.reshape(-1).to(torch.bfloat16).contiguous()
    packed = torch._dyn_quant_pack_4bit_weight(packed_u8, scales, None, GROUP, k, n)
    return lambda x: torch._dyn_quant_matmul_4bit(x, packed, GROUP, k, n)


def k_fbgemm_dynamic(engine="fbgemm", reduce_range=False):
    def build(w, q4=None):
        torch.backends.quantized.engine = engine
        n, k = w.shape
        _, s = requant_int8_per_channel(w)
        qw = torch.quantize_per_channel(w, s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    return build


def k_fp16_dynamic(w, q4=None):
    torch.backends.quantized.engine = "fbgemm"
    packed = torch.ops.quantized.linear_prepack_fp16(w.contiguous(), None)
    return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)


def k_int_mm(with_quant=True):
    """torch._int_mm: per-token symmetric int8 activations (by hand), per-channel int8 weights."""
    def build(w, q4=None):
        q, s = requant_int8_per_channel(w)
        wt = q.t()  # (K, N) view of the (N, K) weight
        if with_quant:
            def fn(x):
                xq, xs = quant_per_token_sym(x)
                return torch._int_mm(xq, wt).float() * (xs * s)
            return fn
        return (lambda xq: torch._int_mm(xq, wt)), torch.int8
    return build


def k_int_mm_contig(w, q4=None):
    q, s = requant_int8_per_channel(w)
    wt = q.t().contiguous()  # (K, N) contiguous

    def fn(x):
        xq, xs = quant_per_token_sym(x)
        return torch._int_mm(xq, wt).float() * (xs * s)
    return fn


def k_onednn_qlinear(w, q4=None):
    """oneDNN u8s8 (VNNI) linear: per-tensor asymmetric uint8 activations (dynamic, by hand),
    per-channel int8 weights, fp32 output."""
    n, k = w.shape
    q, s = requant_int8_per_channel(w)
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    wzp = torch.zeros(n, dtype=torch.int32)

    def fn(x):
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        xs = ((hi - lo) / 255).clamp(min=1e-8)
        xzp = torch.round(-lo / xs).to(torch.int32)
        xq = torch.clamp(torch.round(x / xs) + xzp, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(xq, xs, xzp, packed, s, wzp, None, 1.0, 0,
                                                        torch.float32, "none", [], "")
    return fn


def k_fake_q8_block32(w, q4=None):
    """Accuracy reference only: fp32 matmul on activations rounded to int8 in blocks of 32
    (llama.cpp's Q8_0/Q8_1 activation rounding), exact dequantized weights."""
    w = w.contiguous()

    def fn(x):
        m, k = x.shape
        b = x.float().view(m, k // GROUP, GROUP)
        s = b.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127
        return F.linear((torch.round(b / s) * s).view(m, k), w)
    return fn


KERNELS = {
    # name: (builder, description)
    "fp32": (k_fp32, "F.linear fp32"),
    "bf16": (k_bf16, "F.linear bf16 (x, w bf16)"),
    "int4pack_bf16": (k_int4pack(torch.bfloat16), "_weight_int4pack_mm_for_cpu, bf16 x, g32 (tandem int4 today)"),
    "int4pack_fp32": (k_int4pack(torch.float32), "_weight_int4pack_mm_for_cpu, fp32 x + fp32 scales, g32"),
    "int8pack_bf16": (k_int8pack_bf16, "_weight_int8pack_mm, bf16 x, per-channel int8 w"),
    "dyn_quant_4bit": (k_dyn_quant_4bit, "_dyn_quant_matmul_4bit (int8 dyn act, sym int4 g32 w)"),
    "fbgemm_dyn": (k_fbgemm_dynamic("fbgemm"), "quantized.linear_dynamic, fbgemm, per-channel w"),
    "x86_dyn": (k_fbgemm_dynamic("x86"), "quantized.linear_dynamic, 'x86' engine"),
    "onednn_dyn": (k_fbgemm_dynamic("onednn"), "quantized.linear_dynamic, onednn engine"),
    "fp16_dyn": (k_fp16_dynamic, "quantized.linear_dynamic_fp16 (fp16 w, fp32 math)"),
    "int_mm+quant": (k_int_mm(True), "per-token int8 quant by hand + torch._int_mm + scale"),
    "int_mm_kernel": (k_int_mm(False), "torch._int_mm alone (int8 x already quantized)"),
    "onednn_qlinear": (k_onednn_qlinear, "onednn.qlinear_pointwise u8s8, per-tensor act quant by hand"),
}
ACCURACY_ONLY = {"fake_q8_block32": (k_fake_q8_block32, "fp32 matmul, activations rounded to int8 per 32-block (llama.cpp-like)")}
KERNELS_ALL = {**KERNELS, **ACCURACY_ONLY}


def k_vnni(w, src=None):
    """The hand-written AVX512-VNNI kernel (q4vnni.cpp): int8 activations per 32-block, the GGUF's
    own Q4_1 / Q8_0 blocks as weights."""
    import vnni_ext
    return vnni_ext.make(src, raw=True)


def k_vnni_op(w, src=None):
    """The same kernel behind torch.library.custom_op (what torch.compile needs; adds dispatch cost eagerly)."""
    import vnni_ext
    return vnni_ext.make(src, raw=False)


KERNELS["vnni_q4_1/q8_0"] = (k_vnni, "hand-written AVX512-VNNI: int8 act per 32-block x GGUF Q4_1/Q8_0 blocks (pybind call)")
KERNELS["vnni_op"] = (k_vnni_op, "same kernel as a torch custom op (compile-friendly)")


def build_kernel(name, w, q4=None):
    """-> (fn, in_dtype, cast): fn(x_in) where x_in is x converted to in_dtype (int8 quantized for
    int_mm_kernel)."""
    out = {**KERNELS, **ACCURACY_ONLY}[name][0](w, q4)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, torch.float32


def prep_input(x, dtype):
    if dtype == torch.int8:
        return quant_per_token_sym(x)[0]
    return x.to(dtype)


# ------------------------------------------------------------------ timer

def bench(fn, target_s=0.08, repeats=5, warmup=3):
    """Median over `repeats` of the mean time per call (seconds); each repeat runs ~target_s."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, min(10000, int(target_s / one)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def rel_err(y, ref):
    """(max |y - ref| / max |ref|, ||y - ref|| / ||ref||)."""
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / ref.abs().max()).item(), ((y - ref).norm() / ref.norm()).item()

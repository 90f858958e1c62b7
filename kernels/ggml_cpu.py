"""llama.cpp's quantized blocks, kept as they are in the GGUF file and multiplied on the CPU with
llama.cpp's arithmetic (int8 activations per block of 32, integer dot products with AVX512-VNNI;
kernels/csrc/ggml_cpu.cpp, part of the CPU extension of tandem.kernels.cpu).

- `GGMLWeight`: one weight (N, K) of type Q4_0, Q4_1 or Q8_0, split from the file's blocks
  without rounding anything (Q4_0's offset -8 d is exact in fp16), and packed for the kernel.
- `GGMLLinear`: the module that replaces a projection; `forward` runs the kernel at every batch
  size (each weight word serves 4 activation rows; each output row is one int32 lane).
- `reference_linear`: the kernel's arithmetic in plain torch, for tests.

Where the extension is unavailable (tandem.kernels.cpu.unavailable_reason), the loader dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels.cpu import extension

BLOCK = 32  # weights per block, in every type here
# bytes per block: Q4_0 = fp16 d + 16 bytes of nibbles; Q4_1 = fp16 d, fp16 m + 16; Q8_0 = fp16 d + 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# Types with no lossless form in these kernels (K-quants' 6-bit sub-block scales times an fp16
# super-block scale do not fit an fp16 scale; Q5's fifth bit has no 4-bit home): re-quantized
# once, at load, to Q8_0 blocks of their dequantized values (int8 per 32 with scale amax / 127:
# finer than each type's own grid, so the change is a rounding of at most 1/254 of a block's
# largest weight).
REQUANTIZED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# file type -> the kernel that multiplies it
KINDS = {"Q4_0": "Q4", "Q4_1": "Q4", "Q8_0": "Q8"} | {name: "Q8" for name in REQUANTIZED}
LANES = 16  # output rows per packed group: one per int32 lane of a 512-bit register


@dataclass
class GGMLWeight:
    """One (N, K) weight in a GGML block type, split into arrays without rounding anything:
    qs (N, K/2) uint8 nibbles for Q4_0/Q4_1 (byte j of a block: element j low, j + 16 high, the
    file's order) or (N, K) uint8 = q + 128 for Q8_0; d and m (N, K/32) fp16, element = d q + m
    (Q4_0's m = -8 d, exact in fp16; m is None for Q8_0). `pack` lays them out for the kernel."""

    ggml_type: str  # "Q4_0", "Q4_1" or "Q8_0"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def kind(self) -> str:
        return KINDS[self.ggml_type]

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @classmethod
    def from_blocks(cls, ggml_type: str, data: np.ndarray, shape: tuple[int, int]) -> GGMLWeight:
        """data: the file's bytes of an (N, K) tensor, (N, K/32 * block bytes) uint8; a type of
        REQUANTIZED becomes Q8_0 blocks of its dequantized values."""
        n, k = shape
        if ggml_type in REQUANTIZED:
            import gguf

            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]).reshape(n, k)
            data, ggml_type = gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32),
                                                   gguf.GGMLQuantizationType.Q8_0), "Q8_0"
        if ggml_type not in BLOCK_BYTES or k % BLOCK:
            raise ValueError(f"cannot keep a {ggml_type} tensor of shape {shape} in GGML blocks")
        blocks = np.ascontiguousarray(data).reshape(n, k // BLOCK, BLOCK_BYTES[ggml_type])
        d = blocks[..., :2].copy().view(np.float16)[..., 0]
        if ggml_type == "Q8_0":
            q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
            return cls(ggml_type, torch.from_numpy(q.astype(np.uint8).reshape(n, k)), torch.from_numpy(d), None)
        if ggml_type == "Q4_1":
            m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0], blocks[..., 4:]
        else:  # Q4_0: w = d (q - 8) = d q + (-8 d); -8 d is exact in fp16 (a power-of-two multiple)
            m, qs = (d.astype(np.float32) * -8).astype(np.float16), blocks[..., 2:]
        return cls(ggml_type, torch.from_numpy(np.ascontiguousarray(qs).reshape(n, k // 2)), torch.from_numpy(d),
                   torch.from_numpy(np.ascontiguousarray(m)))

    def rows(self, index: torch.Tensor) -> GGMLWeight:
        """The weight with its rows reordered (e.g. Q/K rows un-permuted for RoPE)."""
        return GGMLWeight(self.ggml_type, self.qs[index].contiguous(), self.d[index].contiguous(),
                          None if self.m is None else self.m[index].contiguous())

    @staticmethod
    def cat(parts: list[GGMLWeight]) -> GGMLWeight:
        """The rows of parts stacked (fused projections); all parts must share K and the kernel
        (Q4_0 beside Q4_1 becomes Q4_1: its m = -8 d carried exactly)."""
        kinds, types = {p.kind for p in parts}, {p.ggml_type for p in parts}
        if len(kinds) != 1 or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("fused GGML weights need one block kind (Q4 or Q8) and one K")
        return GGMLWeight(types.pop() if len(types) == 1 else "Q4_1", torch.cat([p.qs for p in parts]),
                          torch.cat([p.d for p in parts]),
                          None if parts[0].m is None else torch.cat([p.m for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): exactly the file's values (what gguf's dequantize gives)."""
        n, k = self.shape
        d = self.d.float().unsqueeze(-1)
        if self.kind == "Q8":
            return ((self.qs.view(n, k // BLOCK, BLOCK).float() - 128) * d).view(n, k)
        packed = self.qs.view(n, k // BLOCK, BLOCK // 2)
        q = torch.cat([packed & 0xF, packed >> 4], dim=-1).float()
        return (q * d + self.m.float().unsqueeze(-1)).view(n, k)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qs, d, m) in the kernel's layout (ggml_cpu.cpp): rows in groups of 16, one per int32
        lane, each block's 4-byte words interleaved across the group; rows padded with zero
        blocks to a multiple of 16 (their outputs are 0). m is empty unless the type is Q4_1
        (Q4_0's -8 and Q8_0's -128 offsets are applied in the integer sums, as llama.cpp does)."""
        n, k = self.shape
        groups, blocks, words = -(-n // LANES), k // BLOCK, 4 if self.kind == "Q4" else 8
        pad = groups * LANES - n

        def lanes(t: torch.Tensor) -> torch.Tensor:  # (N, G, ...) -> (N/16, G, ..., 16, ...)
            t = F.pad(t, (0,) * (2 * (t.dim() - 1)) + (0, pad)) if pad else t
            t = t.reshape(groups, LANES, *t.shape[1:])
            return t.movedim(1, -2 if t.dim() == 5 else -1).contiguous()

        qs = lanes(self.qs.view(n, blocks, words, 4))
        m = lanes(self.m) if self.ggml_type == "Q4_1" else torch.empty(0, dtype=torch.float16)
        return qs, lanes(self.d), m


class GGMLLinear(nn.Module):
    """x (..., K) @ W^T for a weight kept in GGML blocks; fp32 math, output in x's dtype. The
    weight is packed for the kernel once, here; the kernel runs at every batch size."""

    def __init__(self, weight: GGMLWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.ggml_type = weight.ggml_type
        self.out_features, self.in_features = weight.shape
        qs, d, m = weight.pack()
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.register_buffer("m", m)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._linear = extension().ggml_linear

    @property
    def padded(self) -> bool:
        """True when the kernel's output has padding rows past out_features."""
        return self.out_features % LANES != 0

    def packed(self) -> list[torch.Tensor]:
        """[qs, d, m] as the kernel takes them (the fused layer's argument)."""
        return [self.qs, self.d, self.m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        out = self._linear(flat, self.qs, self.d, self.m)
        if self.padded:
            out = out[:, :self.out_features].contiguous()
        if self.bias is not None:
            out += self.bias
        out = out.view(*x.shape[:-1], self.out_features)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.ggml_type}"


def runs_on_kernels(model: nn.Module) -> bool:
    """Whether every matmul of model is a GGMLLinear (none left to torch's own threads)."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, GGMLLinear))]
    return bool(linears) and all(isinstance(m, GGMLLinear) for m in linears)


def reference_linear(x: torch.Tensor, weight: GGMLWeight) -> torch.Tensor:
    """The kernel's arithmetic in plain torch (for tests): x rounded to int8 per block of 32 with
    scale amax / 127 (ties to even), then sum over blocks of d_x * (dequantized weight . q_x)."""
    flat = x.reshape(-1, weight.shape[1]).float()
    blocks = flat.view(flat.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # as the kernel: x * (1 / d)
    q = (blocks * inverse).round()
    return (q * scale).view_as(flat) @ weight.dequantize().T

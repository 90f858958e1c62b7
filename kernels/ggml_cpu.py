"""llama.cpp's quantized blocks, kept as they are in the GGUF file and multiplied on the CPU with
llama.cpp's arithmetic (int8 activations per block of 32, integer dot products with AVX512-VNNI;
kernels/csrc/ggml_cpu.cpp, part of the CPU extension of tandem.kernels.cpu).

- `GGMLWeight`: one weight (N, K) of type Q4_0, Q4_1 or Q8_0, split from the file's blocks into
  the kernel's arrays without rounding anything (Q4_0's offset -8 d is exact in fp16).
- `GGMLLinear`: the module that replaces a projection; `forward` runs the kernel at every batch
  size (its weight rows are unpacked once per 4 activation rows).
- `reference_linear`: the kernel's arithmetic in plain torch, for tests.

Where the extension is unavailable (tandem.kernels.cpu.unavailable_reason), the loader dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tandem.kernels.cpu import extension

BLOCK = 32  # weights per block, in every type here
# bytes per block: Q4_0 = fp16 d + 16 bytes of nibbles; Q4_1 = fp16 d, fp16 m + 16; Q8_0 = fp16 d + 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
KINDS = {"Q4_0": "Q4", "Q4_1": "Q4", "Q8_0": "Q8"}  # file type -> the kernel that multiplies it


@dataclass
class GGMLWeight:
    """One (N, K) weight in a GGML block type, split into the kernel's arrays (see ggml_cpu.cpp):
    qs (N, K/2) uint8 nibbles for Q4_0/Q4_1 or (N, K) uint8 = q + 128 for Q8_0; d and m (N, K/32)
    fp16 (m is None for Q8_0)."""

    kind: str  # "Q4" or "Q8"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @classmethod
    def from_blocks(cls, ggml_type: str, data: np.ndarray, shape: tuple[int, int]) -> GGMLWeight:
        """data: the file's bytes of an (N, K) tensor, (N, K/32 * block bytes) uint8."""
        n, k = shape
        if ggml_type not in BLOCK_BYTES or k % BLOCK:
            raise ValueError(f"cannot keep a {ggml_type} tensor of shape {shape} in GGML blocks")
        blocks = np.ascontiguousarray(data).reshape(n, k // BLOCK, BLOCK_BYTES[ggml_type])
        d = blocks[..., :2].copy().view(np.float16)[..., 0]
        if ggml_type == "Q8_0":
            q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
            return cls("Q8", torch.from_numpy(q.astype(np.uint8).reshape(n, k)), torch.from_numpy(d), None)
        if ggml_type == "Q4_1":
            m, qs = blocks[..., 2:4].copy().view(np.float16)[..., 0], blocks[..., 4:]
        else:  # Q4_0: w = d (q - 8) = d q + (-8 d); -8 d is exact in fp16 (a power-of-two multiple)
            m, qs = (d.astype(np.float32) * -8).astype(np.float16), blocks[..., 2:]
        return cls("Q4", torch.from_numpy(np.ascontiguousarray(qs).reshape(n, k // 2)), torch.from_numpy(d),
                   torch.from_numpy(np.ascontiguousarray(m)))

    def rows(self, index: torch.Tensor) -> GGMLWeight:
        """The weight with its rows reordered (e.g. Q/K rows un-permuted for RoPE)."""
        return GGMLWeight(self.kind, self.qs[index].contiguous(), self.d[index].contiguous(),
                          None if self.m is None else self.m[index].contiguous())

    @staticmethod
    def cat(parts: list[GGMLWeight]) -> GGMLWeight:
        """The rows of parts stacked (fused projections); all parts must share kind and K."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1 or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("fused GGML weights need one block type and one K")
        return GGMLWeight(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]),
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


class GGMLLinear(nn.Module):
    """x (..., K) @ W^T for a weight kept in GGML blocks; fp32 math, output in x's dtype."""

    def __init__(self, weight: GGMLWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qs", weight.qs)
        self.register_buffer("d", weight.d)
        self.register_buffer("m", weight.m)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._kernel = extension()
        self._call = self._kernel.q4_linear if weight.kind == "Q4" else self._kernel.q8_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        out = self._call(flat, self.qs, self.d, self.m) if self.kind == "Q4" else self._call(flat, self.qs, self.d)
        if self.bias is not None:
            out += self.bias
        out = out.view(*x.shape[:-1], self.out_features)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.kind}"


def reference_linear(x: torch.Tensor, weight: GGMLWeight) -> torch.Tensor:
    """The kernel's arithmetic in plain torch (for tests): x rounded to int8 per block of 32 with
    scale amax / 127 (ties to even), then sum over blocks of d_x * (dequantized weight . q_x)."""
    flat = x.reshape(-1, weight.shape[1]).float()
    blocks = flat.view(flat.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # as the kernel: x * (1 / d)
    q = (blocks * inverse).round()
    return (q * scale).view_as(flat) @ weight.dequantize().T

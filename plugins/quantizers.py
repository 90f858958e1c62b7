"""Built-in weight quantizers.

- int8: weight-only, symmetric, one scale per output channel. Runs on PyTorch's packed CPU kernel
  `aten._weight_int8pack_mm` with bf16 activations (its fast path; fp32 activations take a path
  ~10x slower, measured).
- int4: weight-only, asymmetric, one scale and zero point per group of `group_size` input
  channels, packed for `aten._weight_int4pack_mm_for_cpu` (bf16 activations, as above).
  The LM head goes to int8 (see Quantizer.head_quantizer), for int4 and nf4 alike.
- nf4: 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): 16 levels at the quantiles of a normal
  distribution, one absmax scale per block of `block_size` weights.
- fp8: float8 E4M3 storage with a per-output-channel scale (amax / 448).
  nf4 and fp8 keep a bf16 working copy of the dequantized weight by default (`working_copy=True`):
  a bf16 matmul (AVX512-BF16 on this CPU) runs them faster than fp32 in less memory than fp32
  (packed + bf16 = 0.63x / 0.75x of fp32's bytes). `working_copy=False` keeps only the packed
  weight and dequantizes it in every forward: the smallest, and 5-6x slower than fp32.

Decode at batch 1 is bound by reading the weights, so the packed int8/int4 kernels make it
faster as well as smaller; see bench/RESULTS.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import ConfigError
from tandem.model.quantization import Quantizer, int4_codes, int8_codes
from tandem.plugins import hookimpl

PACKED_DTYPE = torch.bfloat16  # activation dtype of the packed CPU kernels' fast paths


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# -- int8 -------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scales", scales.to(PACKED_DTYPE))  # (N,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(_flat(x).to(PACKED_DTYPE), self.qweight, self.scales)
        return out.view(*x.shape[:-1], -1).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float().unsqueeze(1)


class Int8WeightOnly(Quantizer):
    name = "int8"

    def quantize(self, weight):
        return Int8Linear(*int8_codes(weight))


# -- int4 -------------------------------------------------------------------------------------

class Int4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed)  # (N, K / 2) uint8, the kernel's layout
        self.register_buffer("scales_zeros", scales_zeros)  # (K / group, N, 2) bf16
        self.group_size, self.out_features = group_size, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x).to(PACKED_DTYPE), self.packed,
                                                         self.group_size, self.scales_zeros)
        return out.view(*x.shape[:-1], -1).to(x.dtype)


class Int4WeightOnly(Quantizer):
    """Per group: w ~= (q - 8) * scale + zero with q in [0, 15] (the kernel's convention)."""

    name = "int4"
    GROUP_SIZES = (32, 64, 128, 256)

    def __init__(self, group_size: int = 32):
        if group_size not in self.GROUP_SIZES:
            raise ConfigError(f"int4 group_size must be one of {self.GROUP_SIZES}, got {group_size!r}")
        self.group_size = group_size

    def head_quantizer(self):
        return Int8WeightOnly()

    def check(self, name, weight):
        if weight.shape[1] % self.group_size:
            raise ConfigError(f"its {weight.shape[1]} input channels are not a multiple of group_size "
                              f"{self.group_size}; pick a group_size that divides them")

    def quantize(self, weight):
        q, scales, zeros = int4_codes(weight, self.group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1)  # (K / group, N, 2)
        return Int4Linear(packed, scales_zeros.contiguous().to(PACKED_DTYPE), self.group_size, weight.shape[0])


# -- nf4 --------------------------------------------------------------------------------------

# The 16 NF4 levels (QLoRA, appendix E): quantiles of N(0, 1) normalized to [-1, 1], with an exact 0.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


WORKING_DTYPE = torch.bfloat16  # nf4/fp8 working copies: what the matmul reads


class _WorkingCopy(nn.Module):
    """A packed weight (subclasses: dequantize()) and, optionally, its bf16 working copy."""

    def keep_working_copy(self, keep: bool) -> None:
        self.register_buffer("work", self.dequantize().to(WORKING_DTYPE) if keep else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.work is None:  # the storage format: dequantize every call
            return F.linear(x, self.dequantize().to(x.dtype))
        return F.linear(x.to(self.work.dtype), self.work).to(x.dtype)


def _working_copy_option(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} working_copy must be true or false, got {value!r}")
    return value


class NF4Linear(_WorkingCopy):
    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], block_size: int,
                 working_copy: bool = True):
        super().__init__()
        self.register_buffer("codes", codes)  # (N * K / 2,) uint8: two 4-bit level indices per byte
        self.register_buffer("absmax", absmax)  # (N * K / block_size,) fp32
        self.register_buffer("levels", NF4_LEVELS.clone())
        self.shape, self.block_size = shape, block_size
        self.keep_working_copy(working_copy)

    def dequantize(self) -> torch.Tensor:
        indices = torch.stack([self.codes >> 4, self.codes & 0xF], dim=-1).flatten().long()
        values = self.levels[indices].view(-1, self.block_size) * self.absmax.unsqueeze(1)
        return values.view(self.shape)


class NF4(Quantizer):
    name = "nf4"

    def __init__(self, block_size: int = 64, working_copy: bool = True):
        if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
            raise ConfigError(f"nf4 block_size must be an even integer >= 2, got {block_size!r}")
        self.block_size, self.working_copy = block_size, _working_copy_option(self.name, working_copy)

    def head_quantizer(self):
        return Int8WeightOnly()

    def check(self, name, weight):
        if weight.numel() % self.block_size:
            raise ConfigError(f"its {weight.numel()} weights are not a multiple of block_size {self.block_size}")

    def quantize(self, weight):
        blocks = weight.reshape(-1, self.block_size)
        absmax = blocks.abs().amax(dim=1).clamp(min=1e-10)
        normalized = (blocks / absmax.unsqueeze(1)).flatten()
        # nearest level: the levels are sorted, so compare against the midpoints between them
        midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        indices = torch.bucketize(normalized, midpoints).to(torch.uint8)
        codes = (indices[0::2] << 4) | indices[1::2]
        return NF4Linear(codes, absmax, tuple(weight.shape), self.block_size, self.working_copy)


# -- fp8 --------------------------------------------------------------------------------------

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


class FP8Linear(_WorkingCopy):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, working_copy: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)  # (N, K) float8_e4m3fn
        self.register_buffer("scales", scales)  # (N, 1) fp32
        self.keep_working_copy(working_copy)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales


class FP8(Quantizer):
    name = "fp8"

    def __init__(self, working_copy: bool = True):
        self.working_copy = _working_copy_option(self.name, working_copy)

    def quantize(self, weight):
        scales = (weight.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return FP8Linear((weight / scales).to(torch.float8_e4m3fn), scales, self.working_copy)


@hookimpl
def tandem_quantizers(api_version: int):
    return [Int8WeightOnly, Int4WeightOnly, NF4, FP8]

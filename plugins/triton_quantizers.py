"""Weight-only int8 / int4 quantizers for the GPU: the Triton kernels of tandem.kernels.quantized_matmul.

- int8_triton: symmetric, one scale per output channel (the values of the built-in "int8").
- int4_triton: asymmetric, a scale and zero point per group of `group_size` (32, 64 or 128)
  input channels (the values of the built-in "int4" with the same group_size). The LM head goes
  to int8_triton, as the built-in int4 hands its head to int8.

Both store the kernels' GPU layout (packed codes + bf16 scales) and call the Triton GEMV (decode)
or GEMM (prefill) kernel on CUDA tensors. They are a GPU format: on the CPU they fall back to the
torch reference (dequantize per forward, slow), except under TRITON_INTERPRET=1, where the tests
run the kernels themselves in Triton's interpreter. On the CPU use "int8" / "int4", which run
PyTorch's packed CPU kernels.

The kernels module is imported on first use, not with this plugin: Triton decides at decoration
time whether a kernel compiles or is interpreted, and the plugin manager loads this module early.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from tandem.errors import ConfigError
from tandem.plugins import hookimpl
from tandem.plugins.quantizers import Int4WeightOnly, Int8WeightOnly


def _kernels() -> ModuleType:
    from tandem.kernels import quantized_matmul

    return quantized_matmul


def _use_triton(x: torch.Tensor) -> bool:
    """The kernels on CUDA tensors, and on CPU ones under Triton's interpreter (the tests)."""
    from tandem.kernels._utils import is_interpreting

    return x.is_cuda or is_interpreting()


def _matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bits: int, group_size: int | None) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N) in x's dtype."""
    kernels = _kernels()
    matmul = kernels.quantized_matmul_triton if _use_triton(x) else kernels.quantized_matmul_reference
    out = matmul(x.reshape(-1, x.shape[-1]), qweight, scales, zeros, bits=bits, group_size=group_size)
    return out.view(*x.shape[:-1], -1)


class TritonInt8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.qweight, self.scales, None, 8, None)


class TritonInt4Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N / 2, K) uint8: channels 2p, 2p + 1 in one byte
        self.register_buffer("scales", scales)  # (N, K / group_size) bf16
        self.register_buffer("zeros", zeros)  # (N, K / group_size) bf16
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.qweight, self.scales, self.zeros, 4, self.group_size)


class Int8Triton(Int8WeightOnly):
    name = "int8_triton"

    def quantize(self, weight):
        return TritonInt8Linear(*_kernels().quantize_int8(weight))


class Int4Triton(Int4WeightOnly):
    """The built-in int4's options, checks and values (per group: w ~= (q - 8) * scale + zero,
    q in [0, 15]) in the kernels' layout. group_size 128 reads the fewest bytes per weight (4.25
    bits); 32 (the default, as for "int4") is the most accurate (5 bits)."""

    name = "int4_triton"
    GROUP_SIZES = (32, 64, 128)  # tandem.kernels.quantized_matmul.GROUP_SIZES, without importing Triton

    def head_quantizer(self):
        return Int8Triton()

    def check(self, name, weight):
        super().check(name, weight)
        if weight.shape[0] % 2:
            raise ConfigError(f"its {weight.shape[0]} output channels are odd; int4_triton packs them in pairs")

    def quantize(self, weight):
        return TritonInt4Linear(*_kernels().quantize_int4(weight, self.group_size), self.group_size)


@hookimpl
def tandem_quantizers(api_version: int):
    return [Int8Triton, Int4Triton]

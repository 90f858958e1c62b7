"""Weight quantization: the Quantizer plugin interface and the pass that applies one to a model.

A quantizer turns one linear layer's weight (N, K) into a module computing x @ W^T from a smaller
representation (int8, int4, NF4, FP8...). `quantize_model` swaps every projection of the decoder
layers and the LM head (a tied head gets its own quantized copy; the embedding table stays in the
model dtype, since a lookup reads one row per token and costs nothing to keep exact).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tandem.errors import ConfigError


SCALE_DTYPE = torch.bfloat16  # int8/int4 scales and zeros: what the packed CPU and Triton kernels read


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight (N, K) -> q (N, K) int8 in [-127, 127], scales
    (N,) bf16, w ~= q * scale; q is computed against the bf16-rounded scale the kernels use."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10).to(SCALE_DTYPE)
    q = (weight / scales.float().unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_codes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input channels: weight (N, K) -> q (N, K) uint8
    in [0, 15], scales and zeros (N, K / group_size) bf16, w ~= (q - 8) * scale + zero (zero is
    the value of q = 8: PyTorch's int4pack convention). The caller checks group_size divides K."""
    n, k = weight.shape
    groups = weight.float().view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-10).to(SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)
    q = ((groups - zeros.float()) / scales.float() + 8).round().clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scales.squeeze(-1), zeros.squeeze(-1)


class Quantizer:
    """Base class of weight quantizers. Subclass it, set `name`, validate options in __init__
    (raise ConfigError), and implement `quantize`."""

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = 1

    def __init__(self, **options):
        if options:
            raise ConfigError(f"quantizer {self.name!r} takes no options, got {sorted(options)}")

    def check(self, name: str, weight: torch.Tensor) -> None:
        """Raise ConfigError if this weight (N, K) cannot be quantized (e.g. K not a multiple of the group)."""

    def quantize(self, weight: torch.Tensor) -> nn.Module:
        """A module whose forward(x (..., K)) returns x @ weight.T (..., N) in x's dtype."""
        raise NotImplementedError

    def head_quantizer(self) -> Quantizer | None:
        """The quantizer for the LM head (None: keep it in the model dtype). The head maps to the
        whole vocabulary, so its errors reach every logit: 4-bit formats hand it to 8 bits, as
        llama.cpp's Q4_K_M keeps its output tensor at 6."""
        return self


class QuantizedLinear(nn.Module):
    """A quantized weight module plus the original layer's bias (if any)."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.inner, self.in_features, self.out_features = inner, in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The projections of every decoder layer and the LM head, by qualified name."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (name.startswith("model.layers.") or name == "lm_head")]


def quantize_model(model: nn.Module, quantizer: Quantizer) -> int:
    """Replace the model's linear layers in place (all checked first, so nothing changes on a
    ConfigError). Returns the bytes of weight storage saved."""
    head = quantizer.head_quantizer()
    targets = [(name, linear, head if name == "lm_head" else quantizer) for name, linear in quantizable_linears(model)]
    targets = [(name, linear, q) for name, linear, q in targets if q is not None]
    for name, linear, q in targets:
        try:
            q.check(name, linear.weight)
        except ConfigError as exc:
            raise ConfigError(f"quantizer {q.name!r} cannot quantize {name}: {exc}") from None
    saved = 0
    for name, linear, q in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = q.quantize(linear.weight.detach().float())
        # without a bias the quantized module replaces the layer directly: one module call, not two
        new = inner if linear.bias is None else QuantizedLinear(inner, linear.bias, linear.in_features,
                                                                linear.out_features)
        saved += linear.weight.numel() * linear.weight.element_size() - _nbytes(inner)
        setattr(parent, attr, new)
    return saved


def _nbytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)

"""Helpers shared by the attention kernels: whether Triton runs interpreted, the checks every
wrapper makes on its inputs, and a `tl.dot` that stays exact under the interpreter.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# tl.dot needs every tile side >= 16; past 256 a (BLOCK, D) tile of Q, K and V no longer fits in shared memory.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Kernels use exp2: exp(x) = exp2(x * LOG2E). A constexpr, so kernels can read it (.value in Python).
LOG2E = tl.constexpr(1.4426950408889634)


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Triton reads this
    when a kernel is decorated, i.e. when its module is first imported: set it before that."""
    return bool(triton.knobs.runtime.interpret)


def kernel_flags(dtype: torch.dtype) -> dict:
    """The tl.dot flags for inputs of `dtype` (see `dot`): fp32 is multiplied in full fp32
    ("ieee"), not TF32, so it matches its reference to fp32 rounding."""
    return dict(INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST_BF16=dtype == torch.bfloat16 and is_interpreting())


@triton.jit
def dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST_BF16: Triton's interpreter keeps bf16 as raw uint16
    and its tl.dot multiplies the bit patterns (triton-lang/triton#11584; its debugging guide:
    bf16 ops are unsupported, cast to fp32), so under it bf16 tiles are upcast first. That is
    exact: the GPU's bf16 MMA also forms exact products and sums them in fp32."""
    if UPCAST_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


# -- input checks (ValueError with the offending name and value) ----------------------------------

def check_dtypes(**tensors: torch.Tensor) -> torch.dtype:
    """All tensors share one supported float dtype and one device; returns the dtype."""
    (first_name, first), *rest = tensors.items()
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{first_name} must be float16, bfloat16 or float32, got {first.dtype}")
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise ValueError(f"{name} is {tensor.dtype} but {first_name} is {first.dtype}: they must match")
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    return first.dtype


def check_head_dim(head_dim: int) -> None:
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")


def check_options(num_heads: int, device: torch.device, window, alibi_slopes, scale) -> float | None:
    """window: None or an int >= 1; alibi_slopes: None or fp32 (num_heads,) on the inputs' device;
    scale: None or a positive finite float. Returns the scale (None: the caller's default)."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
    if alibi_slopes is not None:
        if alibi_slopes.shape != (num_heads,) or alibi_slopes.dtype != torch.float32:
            raise ValueError(f"alibi_slopes must be float32 of shape ({num_heads},), "
                             f"got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, the inputs on {device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    return scale


def check_inner_stride(**tensors: torch.Tensor) -> None:
    """The kernels load whole head-dim rows: the last dimension must be contiguous."""
    for name, tensor in tensors.items():
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")

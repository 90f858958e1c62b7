"""llama.cpp's quantized blocks, kept as they are in the GGUF file and multiplied on the CPU with
llama.cpp's arithmetic (int8 activations per block of 32, integer dot products with AVX512-VNNI).

- `GGMLWeight`: one weight (N, K) of type Q4_0, Q4_1 or Q8_0, split from the file's blocks into
  the kernel's arrays without rounding anything (Q4_0's offset -8 d is exact in fp16).
- `GGMLLinear`: the module that replaces a projection; `forward` runs the kernel at every batch
  size (its weight rows are unpacked once per 4 activation rows).
- `extension()`: the compiled kernel (kernels/csrc/ggml_cpu.cpp), built at first use with the
  system C++ compiler (about 40 s on 2 cores) into a cache directory keyed by the source, torch's
  version and the flags, then loaded from there in every later process (milliseconds).
- `available()`: whether this machine can run it (Linux x86-64 with AVX512-F/BW/VL, AVX512-VNNI,
  F16C, and the build succeeded). Where it cannot, the loader dequantizes instead (and says so).

Set TANDEM_GGML_KERNEL=0 to turn the kernel off (weights are then dequantized at load time), and
TANDEM_CACHE_DIR to move the build cache (default ~/.cache/tandem).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block, in every type here
# type -> (bytes per block, has a min): Q4_0 = fp16 d + 16 bytes; Q4_1 = fp16 d, fp16 m + 16; Q8_0 = fp16 d + 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
KINDS = {"Q4_0": "Q4", "Q4_1": "Q4", "Q8_0": "Q8"}  # file type -> the kernel that multiplies it
_SOURCE = Path(__file__).with_name("csrc") / "ggml_cpu.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"}

_lock = threading.Lock()
_extension = None
_failure: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")


def cpu_supported() -> str | None:
    """None if this CPU can run the kernel, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as exc:
        return f"cannot read /proc/cpuinfo ({exc})"
    missing = sorted(_CPU_FLAGS - set(flags))
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def unavailable_reason() -> str | None:
    """None if the kernel is usable here (building it on first call), else why not."""
    if os.environ.get("TANDEM_GGML_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return "TANDEM_GGML_KERNEL=0"
    reason = cpu_supported()
    if reason is None:
        try:
            extension()
        except RuntimeError as exc:
            reason = str(exc)
    return reason


def available() -> bool:
    return unavailable_reason() is None


def extension():
    """The compiled kernel module (built once per source/torch/flags, then loaded from the cache).
    Raises RuntimeError (with the compiler's reason) if it cannot be built."""
    global _extension, _failure
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is None:
            if _failure is not None:
                raise RuntimeError(_failure)
            key = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_FLAGS).encode())
            build = cache_dir() / "kernels" / f"ggml_cpu-{key.hexdigest()[:16]}"
            build.mkdir(parents=True, exist_ok=True)
            fresh = not any(build.glob("*.so"))
            if fresh:
                log.warning("building the GGML CPU kernel into %s (once; about 40 s)", build)
            start = time.monotonic()
            try:
                from torch.utils.cpp_extension import load
                _extension = load(name="tandem_ggml_cpu", sources=[str(_SOURCE)], build_directory=str(build),
                                  extra_cflags=_FLAGS, verbose=False)
            except Exception as exc:  # the compiler's errors come as several types
                _failure = f"the GGML CPU kernel did not build in {build}: {type(exc).__name__}: {exc}"
                raise RuntimeError(_failure) from exc
            if fresh:
                log.warning("built the GGML CPU kernel in %.0f s", time.monotonic() - start)
    return _extension


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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


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

    def weight(self) -> GGMLWeight:
        return GGMLWeight(self.kind, self.qs, self.d, self.m)

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

"""Build (once, cached in bench/issue17_study/build) and wrap the AVX512-VNNI Q4_1/Q8_0 kernel of q4vnni.cpp."""
from __future__ import annotations

import os
import time

import torch

_EXT = None
HERE = os.path.dirname(os.path.abspath(__file__))


def ext():
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load
        build = os.path.join(HERE, "build")
        os.makedirs(build, exist_ok=True)
        t0 = time.time()
        _EXT = load(name="q4vnni", sources=[os.path.join(HERE, "q4vnni.cpp")], build_directory=build,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq",
                                  "-mf16c", "-mfma", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
        _EXT.build_s = time.time() - t0
    return _EXT


def pack_q4_1(q4):
    """Q4 (codes (N, K) uint8, d, m fp32 holding fp16 values) -> (qs (N, K/2) u8, d f16, m f16):
    the GGUF block bytes, byte j of a block = q[j] | q[j + 16] << 4."""
    n, k = q4.q.shape
    g = q4.q.view(n, k // 32, 32)
    qs = (g[..., :16] | (g[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    return qs, q4.d.half().contiguous(), q4.m.half().contiguous()


def pack_q8_0(q8):
    qu = (q8.q.to(torch.int16) + 128).to(torch.uint8).contiguous()
    return qu, q8.d.half().contiguous()


_OPS = None


def ops():
    """The kernels as torch custom ops (so torch.compile keeps them in one graph)."""
    global _OPS
    if _OPS is None:
        e = ext()

        @torch.library.custom_op("perf17::q41_linear", mutates_args=())
        def q41_linear(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return e.q41_linear(x, qs, d, m)

        @q41_linear.register_fake
        def _(x, qs, d, m):
            return x.new_empty(x.shape[0], qs.shape[0])

        @torch.library.custom_op("perf17::q80_linear", mutates_args=())
        def q80_linear(x: torch.Tensor, qu: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return e.q80_linear(x, qu, d)

        @q80_linear.register_fake
        def _(x, qu, d):
            return x.new_empty(x.shape[0], qu.shape[0])
        _OPS = (torch.ops.perf17.q41_linear, torch.ops.perf17.q80_linear)
    return _OPS


def make(src, raw=False):
    e = ext()
    q41, q80 = (e.q41_linear, e.q80_linear) if raw else ops()
    if hasattr(src, "m"):
        qs, d, m = pack_q4_1(src)
        return lambda x: q41(x, qs, d, m)
    if src is not None and src.q.dtype == torch.int8:
        qu, d = pack_q8_0(src)
        return lambda x: q80(x, qu, d)
    raise ValueError("vnni kernel needs the raw Q4_1 / Q8_0 weight")

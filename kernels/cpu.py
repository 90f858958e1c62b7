"""tandem's CPU extension: C++ kernels for the decode step on x86-64 CPUs with AVX512 (csrc/):

- ggml_cpu.cpp: matmuls over GGUF Q4_0/Q4_1/Q8_0 blocks (tandem.kernels.ggml_cpu wraps them);
- cpu_ops.cpp: RMSNorm and paged decode attention in one pass each (`rms_norm`, `paged_decode`),
  and the fused decoder layer (`fused_layer`);
- lora_cpu.cpp: the LoRA adapters' low-rank updates, tokens grouped by adapter (`lora_add`).

Built at first use with the system C++ compiler (torch.utils.cpp_extension; about 40 s on 2 cores)
into a cache directory keyed by the sources, torch's version and the flags, then loaded from there
by every later process in milliseconds. Called through pybind, not torch.library: a custom op's
Python dispatch adds ~10 us a call, a large share of a small model's decode step.

`unavailable_reason()` says why it cannot run here (not Linux x86-64; a CPU without AVX512-F/BW/
VL/DQ, AVX512-VNNI or F16C; TANDEM_CPU_KERNELS=0; the build failed): the model then keeps torch's
eager ops and dequantized weights. TANDEM_CACHE_DIR moves the build cache (default ~/.cache/tandem).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("bindings.cpp", "ggml_cpu.cpp", "cpu_ops.cpp",
                                                                       "lora_cpu.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / "thread_pool.h"]  # the kernels' threads (not OpenMP's)
# -ffp-contract=off: a * b + c stays two roundings where the eager torch op it mirrors has two.
_FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"}

_lock = threading.Lock()
_extension = None
_failure: str | None = None
builds = 0  # compilations this process ran (0 once the cache is warm; never more than 1)


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")


def cpu_supported() -> str | None:
    """None if this CPU can run the kernels, else why not."""
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
    """None if the extension runs here (building it on the first call), else why not."""
    if os.environ.get("TANDEM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "TANDEM_CPU_KERNELS=0"
    reason = cpu_supported()
    if reason is None:
        try:
            extension()
        except RuntimeError as exc:
            reason = str(exc)
    return reason


def extension():
    """The compiled module (built once per sources/torch/flags, then loaded from the cache).
    Raises RuntimeError, with the compiler's reason, if it cannot be built."""
    global _extension, _failure, builds
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is None:
            if _failure is not None:
                raise RuntimeError(_failure)
            key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + torch.__version__.encode()
                                 + " ".join(_FLAGS).encode()).hexdigest()[:16]
            build = cache_dir() / "kernels" / f"tandem_cpu-{key}"
            build.mkdir(parents=True, exist_ok=True)
            fresh = not any(build.glob("*.so"))
            if fresh:
                builds += 1
                log.warning("building tandem's CPU kernels into %s (once; about 40 s)", build)
            start = time.monotonic()
            # ninja (a dependency) lives beside this Python; a venv used without activating it
            # does not have that directory on PATH
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
            try:
                from torch.utils.cpp_extension import load
                _extension = load(name="tandem_cpu", sources=[str(p) for p in _SOURCES], build_directory=str(build),
                                  extra_cflags=_FLAGS, verbose=False)
            except Exception as exc:  # the compiler's errors come as several types
                _failure = f"tandem's CPU kernels did not build in {build}: {type(exc).__name__}: {exc}"
                raise RuntimeError(_failure) from exc
            if fresh:
                log.warning("built tandem's CPU kernels in %.0f s", time.monotonic() - start)
    return _extension


_ops_checked = False
_ops = None


def ops():
    """The extension if it runs here, else None (checked once per process; the reason is logged)."""
    global _ops_checked, _ops
    if not _ops_checked:
        reason = unavailable_reason()
        if reason is not None:
            log.warning("tandem's CPU kernels are off, torch's eager ops run instead: %s", reason)
        _ops, _ops_checked = (extension() if reason is None else None), True
        if _ops is not None:
            set_num_threads(torch.get_num_threads())
    return _ops


def set_num_threads(n: int) -> None:
    """Threads each CPU kernel uses, the caller's included (tandem.LLM's num_threads). The
    kernels run on their own pool (kernels/csrc/thread_pool.h), not torch's OpenMP threads."""
    if _extension is not None:
        _extension.set_num_threads(n)

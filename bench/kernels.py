"""Kernel benchmarks (#5): every Triton kernel in tandem.kernels against its torch baseline, on one GPU.

- flash_attention vs SDPA restricted to its FlashAttention backend, in TFLOP/s (4 B H T S D,
  halved when causal), up to the issue's B 4, H 32, T = S 4096, D 128 causal bf16.
- paged_attention_decode vs gather + SDPA, in GB/s (K/V bytes of every context + q + out + block
  tables) and % of the device's peak bandwidth (datasheet table, else a measured device copy).
- rms_norm (plain and with the fused residual add), rotary_embedding, silu_and_mul vs their torch
  references run eagerly, in GB/s of bytes read and written.
- quantized_matmul: int4 (group 128) and int8 GEMV at batch 1 and GEMM at batch 16 / 128 vs a bf16
  torch matmul, on 4096x4096, 4096->14336 and 14336->4096 weights; the ratio is bf16 time / kernel time.

Times are triton.testing.do_bench medians (L2 flushed between runs). Prints a table and writes JSON
(device, versions, each case's shape, ms, metric, baseline, ratio; the issue's targets, pass/fail).
`--smoke` runs tiny shapes on the CPU through Triton's interpreter, timed once by the wall clock,
to check this script end to end (its figures mean nothing).

    .venv/bin/python bench/kernels.py [--out bench/kernels.json] [--only qmm paged ...] [--tune-gemv]
    .venv/bin/python bench/kernels.py --smoke [--out /tmp/kernels.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "kernels.json"
FAMILIES = ("flash", "paged", "norm", "rotary", "silu", "qmm")
# datasheet HBM bandwidth, bytes/s; first match on the device name wins
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))
INT4_GROUP = 128
# The targets: (kernel, shape) -> (what is compared, minimum). "speed-up": baseline time /
# kernel time; "peak": the kernel's bandwidth / the device's peak bandwidth.
TARGETS = {
    ("flash_attention", "B=4 H=32 Hkv=32 T=S=4096 D=128 causal"): ("speed-up", 0.8),
    ("paged_attention_decode", "B=64 H=32 Hkv=8 context=4096 D=128 block=16"): ("peak", 0.6),
    ("int4 gemv", "M=1 N=4096 K=4096"): ("speed-up", 2.5),
    ("int4 gemv", "M=1 N=14336 K=4096"): ("speed-up", 2.5),
}


@dataclass
class Shapes:
    """One benchmark's shapes; GPU holds the real ones, SMOKE tiny ones."""

    dtype: torch.dtype
    flash: list  # (B, H, H_kv, T, D, causal)
    paged: list  # (B, H, H_kv, context, D, block_size)
    norm: list  # (tokens, hidden)
    rotary: list  # (tokens, H, H_kv, D)
    silu: list  # (tokens, intermediate)
    qmm: list  # (N, K) weights
    qmm_batches: tuple = (1, 16, 128)
    gemv_sweep: dict = field(default_factory=dict)


GPU = Shapes(
    dtype=torch.bfloat16,
    flash=[(4, 32, 32, 4096, 128, True), (1, 32, 32, 8192, 128, True), (8, 32, 8, 2048, 128, True),
           (4, 32, 32, 4096, 128, False)],
    paged=[(64, 32, 8, 4096, 128, 16), (1, 32, 8, 4096, 128, 16), (8, 32, 8, 16384, 128, 16),
           (256, 32, 8, 1024, 128, 16), (64, 32, 32, 2048, 128, 16)],
    norm=[(4096, 4096), (16384, 8192)],
    rotary=[(4096, 32, 8, 128), (16384, 32, 8, 128)],
    silu=[(4096, 14336), (16384, 14336)],
    qmm=[(4096, 4096), (14336, 4096), (4096, 14336)],
    gemv_sweep=dict(block_n=(2, 4, 8, 16), block_k=(256, 512, 1024, 2048), split_k=(1, 2, 4)),
)
SMOKE = Shapes(
    dtype=torch.float32,
    flash=[(1, 2, 1, 32, 16, True)], paged=[(2, 2, 1, 40, 16, 16)], norm=[(4, 64)], rotary=[(4, 2, 1, 16)],
    silu=[(4, 64)], qmm=[(64, 128)], qmm_batches=(1, 16),
    gemv_sweep=dict(block_n=(4,), block_k=(128,), split_k=(1, 2)),
)


@dataclass
class Result:
    kernel: str
    shape: str
    ms: float
    metric: str  # "TFLOP/s" or "GB/s"
    value: float
    baseline: str
    baseline_ms: float
    baseline_value: float
    ratio: float  # baseline time / kernel time: > 1 means the kernel is faster
    note: str = ""


# -- timing -----------------------------------------------------------------------------------------

def gpu_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def wall_clock_timer(fn: Callable[[], object]) -> float:
    """--smoke: one call, wall clock (the interpreter is slow; nothing here is a measurement)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(kernel: str, shape: str, metric: str, amount: float, run, baseline_name: str, baseline,
            timer, note: str = "") -> Result:
    """amount: FLOPs (TFLOP/s) or bytes (GB/s) per call, the same for the kernel and its baseline."""
    scale = 1e12 if metric == "TFLOP/s" else 1e9
    ms, baseline_ms = timer(run), timer(baseline)
    return Result(kernel, shape, ms, metric, amount / ms / 1e-3 / scale, baseline_name, baseline_ms,
                  amount / baseline_ms / 1e-3 / scale, baseline_ms / ms, note)


def peak_bandwidth(device: torch.device, timer) -> tuple[float | None, str]:
    """Bytes/s: the datasheet figure of a known GPU, else a measured device-to-device copy."""
    if device.type != "cuda":
        return None, "none (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BANDWIDTH:
        if key in name:
            return peak, f"datasheet ({key})"
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timer(lambda: dst.copy_(src)) * 1e-3), "measured device copy (read + write)"


# -- benchmarks, one family each --------------------------------------------------------------------

def bench_flash(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels.flash_attention import flash_attention_triton

    results = []
    for b, h, h_kv, t, d, causal in s.flash:
        q = torch.randn(b, h, t, d, dtype=s.dtype, device=device)
        k, v = (torch.randn(b, h_kv, t, d, dtype=s.dtype, device=device) for _ in range(2))
        k_full, v_full = k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1)  # SDPA: KV expanded
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        results.append(measure(
            "flash_attention", f"B={b} H={h} Hkv={h_kv} T=S={t} D={d} {'causal' if causal else 'full'}",
            "TFLOP/s", flops, lambda: flash_attention_triton(q, k, v, causal=causal),
            "torch SDPA (flash backend)" if device.type == "cuda" else "torch SDPA",
            lambda: _sdpa_flash(q, k_full, v_full, causal), timer))
    return results


def _sdpa_flash(q, k, v, causal):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_paged(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels.paged_attention_decode import paged_attention_decode_triton

    results = []
    for b, h, h_kv, context, d, block_size in s.paged:
        blocks_per_seq = -(-context // block_size)
        k_cache, v_cache = (torch.randn(b * blocks_per_seq, block_size, h_kv, d, dtype=s.dtype, device=device)
                            for _ in range(2))
        # each sequence's blocks scattered over the pool, as the block manager hands them out
        tables = torch.randperm(b * blocks_per_seq, device=device).view(b, blocks_per_seq).int()
        lens = torch.full((b,), context, dtype=torch.int32, device=device)
        q = torch.randn(b, h, d, dtype=s.dtype, device=device)
        size = q.element_size()
        nbytes = 2 * b * context * h_kv * d * size + 2 * q.numel() * size + tables.numel() * 4 + b * 4
        result = measure(
            "paged_attention_decode", f"B={b} H={h} Hkv={h_kv} context={context} D={d} block={block_size}",
            "GB/s", nbytes, lambda: paged_attention_decode_triton(q, k_cache, v_cache, tables, lens),
            "torch gather + SDPA", lambda: _gather_sdpa(q, k_cache, v_cache, tables, lens), timer)
        result.note = f"{100 * result.value * 1e9 / peak:.0f}% of peak" if peak else ""
        results.append(result)
    return results


def _gather_sdpa(q, k_cache, v_cache, tables, lens):
    """The torch baseline: gather each sequence's blocks into a dense (B, Hkv, S, D) copy, then SDPA."""
    keys = k_cache[tables.long()].flatten(1, 2).transpose(1, 2)  # (B, Hkv, S, D)
    values = v_cache[tables.long()].flatten(1, 2).transpose(1, 2)
    valid = torch.arange(keys.shape[2], device=q.device) < lens.unsqueeze(1)  # (B, S)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :],
                                         enable_gqa=True)
    return out.squeeze(2)


def bench_norm(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    results = []
    for tokens, hidden in s.norm:
        x, residual = (torch.randn(tokens, hidden, dtype=s.dtype, device=device) for _ in range(2))
        weight = torch.ones(hidden, dtype=s.dtype, device=device)
        nbytes = 2 * x.numel() * x.element_size()
        results.append(measure("rms_norm", f"tokens={tokens} hidden={hidden}", "GB/s", nbytes,
                               lambda: rms_norm_triton(x, weight), "torch eager (reference)",
                               lambda: rms_norm_reference(x, weight), timer))
        results.append(measure("rms_norm + residual", f"tokens={tokens} hidden={hidden}", "GB/s", 2 * nbytes,
                               lambda: rms_norm_triton(x, weight, residual=residual), "torch eager (reference)",
                               lambda: rms_norm_reference(x, weight, residual=residual), timer))
    return results


def bench_rotary(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels.rotary_embedding import rotary_embedding_reference, rotary_embedding_triton

    results = []
    for tokens, h, h_kv, d in s.rotary:
        q = torch.randn(tokens, h, d, dtype=s.dtype, device=device)
        k = torch.randn(tokens, h_kv, d, dtype=s.dtype, device=device)
        positions = torch.randint(0, 8192, (tokens,), device=device)
        cos, sin = (torch.randn(8192, d // 2, device=device) for _ in range(2))
        # q and k read and written in place; one fp32 cos and sin row per token
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + tokens * (d * 4 + 8)
        results.append(measure("rotary_embedding", f"tokens={tokens} H={h} Hkv={h_kv} D={d}", "GB/s", nbytes,
                               lambda: rotary_embedding_triton(q, k, positions, cos, sin), "torch eager (reference)",
                               lambda: rotary_embedding_reference(q, k, positions, cos, sin), timer))
    return results


def bench_silu(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels.silu_and_mul import silu_and_mul_reference, silu_and_mul_triton

    results = []
    for tokens, inner in s.silu:
        x = torch.randn(tokens, 2 * inner, dtype=s.dtype, device=device)
        nbytes = 3 * tokens * inner * x.element_size()
        results.append(measure("silu_and_mul", f"tokens={tokens} I={inner}", "GB/s", nbytes,
                               lambda: silu_and_mul_triton(x), "torch eager (reference)",
                               lambda: silu_and_mul_reference(x), timer))
    return results


def bench_qmm(s: Shapes, device, timer, peak) -> list[Result]:
    from tandem.kernels import quantized_matmul as qmm

    results = []
    for n, k in s.qmm:
        weight = torch.randn(n, k, device=device) * 0.02
        dense = weight.to(torch.bfloat16)
        formats = {"int4": (*qmm.quantize_int4(weight, INT4_GROUP), 4, INT4_GROUP),
                   "int8": (*qmm.quantize_int8(weight), None, 8, None)}
        del weight
        for m in s.qmm_batches:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            for name, (qweight, scales, zeros, bits, group) in formats.items():
                kind = "gemv" if m <= qmm.GEMV_MAX_M else "gemm"
                stored = sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)
                gemv = kind == "gemv"
                amount = stored + 2 * (x.numel() + m * n) if gemv else 2 * m * n * k
                results.append(measure(
                    f"{name} {kind}", f"M={m} N={n} K={k}", "GB/s" if gemv else "TFLOP/s", amount,
                    lambda: qmm.quantized_matmul_triton(x, qweight, scales, zeros, bits=bits, group_size=group),
                    "torch bf16 matmul", lambda: x @ dense.T, timer,
                    note=f"group {group}" if group else ""))
    return results


def tune_gemv(s: Shapes, device, timer) -> list[dict]:
    """--tune-gemv: int4 GEMV at batch 1 over a grid of tiles; the fastest first."""
    from tandem.kernels import quantized_matmul as qmm

    rows = []
    for n, k in s.qmm:
        qweight, scales, zeros = qmm.quantize_int4(torch.randn(n, k, device=device) * 0.02, INT4_GROUP)
        x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
        for block_n in s.gemv_sweep["block_n"]:
            for block_k in s.gemv_sweep["block_k"]:
                for split_k in s.gemv_sweep["split_k"]:
                    run = lambda: qmm.quantized_matmul_triton(x, qweight, scales, zeros, bits=4, group_size=INT4_GROUP,  # noqa: E731
                                                              block_n=block_n, block_k=block_k, split_k=split_k)
                    rows.append(dict(N=n, K=k, block_n=block_n, block_k=block_k, split_k=split_k, ms=timer(run)))
    return sorted(rows, key=lambda r: (r["N"], r["K"], r["ms"]))


BENCHMARKS = {"flash": bench_flash, "paged": bench_paged, "norm": bench_norm, "rotary": bench_rotary,
              "silu": bench_silu, "qmm": bench_qmm}


# -- report ------------------------------------------------------------------------------------------

def check_targets(results: list[Result], peak: float | None) -> list[dict]:
    """Each target's measured value and "pass" / "fail", or "not measured" (e.g. under --smoke)."""
    by_key = {(r.kernel, r.shape): r for r in results}
    targets = []
    for (kernel, shape), (compared, minimum) in TARGETS.items():
        r = by_key.get((kernel, shape))
        if r is None or (compared == "peak" and not peak):
            value = None
        else:
            value = r.ratio if compared == "speed-up" else r.value * 1e9 / peak
        status = "not measured" if value is None else "pass" if value >= minimum else "fail"
        goal = f"speed-up >= {minimum}x" if compared == "speed-up" else f">= {minimum:.0%} of peak bandwidth"
        targets.append(dict(kernel=kernel, shape=shape, target=goal, baseline=r.baseline if r else None,
                            value=value, status=status))
        measured = "" if value is None else f" ({value:.2f})"
        print(f"target {kernel} {shape}: {goal}: {status}{measured}")
    return targets


def print_table(results: list[Result]) -> None:
    header = f"{'kernel':<24} {'shape':<46} {'ms':>9} {'value':>16} {'baseline ms':>12} {'baseline':>16} {'ratio':>7}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.kernel:<24} {r.shape:<46} {r.ms:>9.4f} {r.value:>9.1f} {r.metric:<6} {r.baseline_ms:>12.4f} "
              f"{r.baseline_value:>9.1f} {r.metric:<6} {r.ratio:>6.2f}x  {r.note}")


def run_families(families: list[str], shapes: Shapes, device: torch.device, timer, peak) -> tuple[list[Result], dict]:
    """The results of each family, and the families skipped because a kernel module is missing."""
    results, skipped = [], {}
    for family in families:
        try:
            results += BENCHMARKS[family](shapes, device, timer, peak)
        except ModuleNotFoundError as exc:  # a kernel module not written yet
            skipped[family] = str(exc)
            print(f"skipped {family}: {exc}")
    return results, skipped


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; --smoke: none)")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="kernel families to run")
    parser.add_argument("--tune-gemv", action="store_true", help="also sweep the int4 GEMV tiles at batch 1")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, interpreted: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports tandem.kernels
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke")
    import triton

    shapes, device = (SMOKE, torch.device("cpu")) if args.smoke else (GPU, torch.device("cuda"))
    timer = wall_clock_timer if args.smoke else gpu_timer
    torch.manual_seed(0)
    peak, peak_source = peak_bandwidth(device, timer)
    results, skipped = run_families(args.only, shapes, device, timer, peak)
    print_table(results)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__, smoke=args.smoke,
                  peak_bandwidth_GBps=peak and peak / 1e9, peak_bandwidth_source=peak_source,
                  results=[asdict(r) for r in results], skipped=skipped, targets=check_targets(results, peak))
    if args.tune_gemv:
        report["gemv_sweep"] = tune_gemv(shapes, device, timer)
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

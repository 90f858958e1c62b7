"""tandem's CPU kernels alone and in an engine thread.

1. The GGML block matmul's throughput (GFLOP/s) by rows M on the default model's shapes (Q4_0
   gate/up and down, the Q8_0 LM head), two threads, torch's own ops on the calling thread (as in
   an engine step).
2. Batch-1 decode ITL of the default model driven from the main thread, from a new thread, and
   through AsyncEngine (the workers' engine thread), with the step's torch ops on the stepping
   thread alone (serial_torch, tandem.LLM's setting on the kernels) and without it.

    .venv/bin/python bench/cpu_kernels.py [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import gguf
import numpy as np
import torch

import tandem
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.llm_engine import torch_on_one_thread
from tandem.kernels.ggml_cpu import GGMLLinear, GGMLWeight
from tandem.outputs import StreamDelta


def matmul_table(threads: int) -> None:
    torch.set_num_threads(threads)
    print("| weight | M=1 | M=16 | M=64 | M=512 |\n|---|---|---|---|---|")
    for name, (qtype, n, k) in {"gate_up 3072x576 Q4_0": ("Q4_0", 3072, 576),
                                "down 576x1536 Q4_0": ("Q4_0", 576, 1536),
                                "LM head 49152x576 Q8_0": ("Q8_0", 49152, 576)}.items():
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.05
        linear = GGMLLinear(GGMLWeight.from_blocks(qtype, gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]),
                                                   (n, k)))
        cells = []
        for m in (1, 16, 64, 512):
            x = torch.randn(m, k)
            with torch_on_one_thread():
                linear(x)
                times = []
                for _ in range(30 if n < 10000 else 8):
                    start = time.perf_counter()
                    linear(x)
                    times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1e3
            cells.append(f"{ms:.3f} ms, {2 * m * n * k / ms / 1e6:.0f} GFLOP/s")
        print(f"| {name} | " + " | ".join(cells) + " |")


def itl_table(threads: int) -> None:
    llm = tandem.LLM("smollm2-135m", num_threads=threads, progress=False, kv_cache_memory=256 << 20)
    prompt = [(13 * i) % 30000 + 100 for i in range(100)]
    params = tandem.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def generate() -> float:
        return llm.generate([prompt], params)[0].metrics.mean_itl * 1e3

    def on_thread() -> float:
        result = []
        t = threading.Thread(target=lambda: result.append(generate()))
        t.start()
        t.join()
        return result[0]

    async def streamed(engine: AsyncEngine) -> float:
        stamps = []
        stream = await engine.add_request(f"bench-{time.monotonic_ns()}", prompt, params)
        async for item in stream:
            if isinstance(item, StreamDelta):
                stamps.append(time.perf_counter())
        return statistics.mean(b - a for a, b in zip(stamps, stamps[1:])) * 1e3

    def measure(run) -> dict[bool, str]:
        cells = {}
        for serial in (True, False):
            llm.engine.serial_torch = serial
            run()  # warm-up
            cells[serial] = f"{statistics.median(run() for _ in range(3)):.2f} ms"
        return cells

    rows = {"main thread (LLM.generate)": measure(generate), "a new thread (LLM.generate)": measure(on_thread)}
    engine = AsyncEngine(llm.engine)  # from here on only its thread steps the engine
    rows["AsyncEngine (a worker's engine thread)"] = measure(lambda: asyncio.run(streamed(engine)))
    engine.shutdown()
    llm.engine.serial_torch = True
    print("\n| driven from | ITL, serial_torch on (the default) | ITL, serial_torch off |\n|---|---|---|")
    for name, cells in rows.items():
        print(f"| {name} | {cells[True]} | {cells[False]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    matmul_table(args.threads)
    itl_table(args.threads)


if __name__ == "__main__":
    main()

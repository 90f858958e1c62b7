"""Table 1: per-matmul time (µs) for every kernel x weight shape x M, real SmolLM2-135M weights.

Each layer shape rotates through the 30 layers' own weights (as a decode step does: 30 distinct
weights of each shape per token), the LM head is the one 49152x576 tied embedding (Q8_0).
Kernel-only timings take the input already in the kernel's dtype; the cast cost is timed apart.

    THREADS=2 .venv/bin/python bench/issue17_study/bench_kernels.py [--kernels a,b] [--shapes a,b] [--ms 1,2]
Writes bench/issue17_study/results/kernels.jsonl (one line per measurement, appended) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from common import KERNELS, bench, build_kernel, load_model_weights, prep_input

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/kernels.jsonl"


def shapes_from(model):
    L = model["layers"]

    def cat4(keys):
        from common import Q4
        return [Q4(torch.cat([l[k].q for k in keys]), torch.cat([l[k].d for k in keys]),
                   torch.cat([l[k].m for k in keys])) for l in L]
    return {
        "q/o 576x576": [l["q"] for l in L],
        "k/v 192x576": [l["k"] for l in L],
        "qkv 960x576": cat4(["q", "k", "v"]),
        "gate/up 1536x576": [l["gate"] for l in L],
        "gate_up 3072x576": cat4(["gate", "up"]),
        "down 576x1536": [l["down"] for l in L],
        "head 49152x576": [model["embed"]],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--ms", default="1,2,4,8,16,64")
    ap.add_argument("--target", type=float, default=0.06)
    args = ap.parse_args()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    t0 = time.time()
    model = load_model_weights()
    print(f"weights loaded in {time.time() - t0:.1f}s, threads={torch.get_num_threads()}", flush=True)
    shapes = shapes_from(model)
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if any(s in k for s in args.shapes.split(","))}
    ms = [int(m) for m in args.ms.split(",")]
    K = {}
    for shape, ws in shapes.items():
        n, k = ws[0].q.shape
        dense = [w.dequant() for w in ws]
        q4s = ws  # the raw Q4_1 / Q8_0 objects (builders use them where they can)
        for kname in args.kernels.split(","):
            try:
                tb = time.time()
                built = [build_kernel(kname, d, q) for d, q in zip(dense, q4s)]
                build_s = time.time() - tb
            except Exception as exc:  # noqa: BLE001
                print(f"{shape:18s} {kname:15s} BUILD FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            fns, dtype = [b[0] for b in built], built[0][1]
            row = []
            for m in ms:
                x = torch.randn(m, k)
                xin = prep_input(x, dtype)
                try:
                    i = [0]

                    def call():
                        fns[i[0] % len(fns)](xin)
                        i[0] += 1
                    sec = bench(call, target_s=args.target)
                except Exception as exc:  # noqa: BLE001
                    print(f"{shape:18s} {kname:15s} M={m} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    row.append(None)
                    continue
                row.append(sec * 1e6)
                with open(OUT, "a") as f:
                    f.write(json.dumps({"kernel": kname, "shape": shape, "N": n, "K": k, "M": m,
                                        "us": sec * 1e6, "copies": len(fns), "build_s": build_s,
                                        "threads": torch.get_num_threads()}) + "\n")
            print(f"{shape:18s} {kname:15s} " + " ".join("   n/a  " if v is None else f"{v:8.1f}" for v in row),
                  flush=True)
    # the casts tandem's packed path pays around each matmul (fp32 -> bf16 in, bf16 -> fp32 out)
    for m in ms:
        for k, n in [(576, 576), (576, 1536), (1536, 576), (576, 49152)]:
            x, y = torch.randn(m, k), torch.randn(m, n, dtype=torch.bfloat16)
            sec = bench(lambda: (x.to(torch.bfloat16), y.to(torch.float32)), target_s=0.03)
            with open(OUT, "a") as f:
                f.write(json.dumps({"kernel": "cast_in+out", "shape": f"{k}->{n}", "N": n, "K": k, "M": m,
                                    "us": sec * 1e6}) + "\n")
            print(f"casts M={m} K={k} N={n}: {sec * 1e6:.1f} us")


if __name__ == "__main__":
    main()

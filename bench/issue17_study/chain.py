"""Table 2: one whole decode step (30 layers + final norm + LM head + argmax) of the minimal model,
eager, real weights, context 192 (the engine benchmark's 128 prompt + ~half of 128 generated),
for M = 1, 16, 64 sequences; ms/step and tokens/s = M / step. "noop" rows remove the matmuls
(each returns a preallocated buffer) to show what everything else costs.

    THREADS=2 .venv/bin/python bench/issue17_study/chain.py [--configs a,b] [--ms 1,16,64]
Writes bench/issue17_study/results/chain.jsonl (appended).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from common import bench, load_model_weights
from mini import Mini, uniform

BF, F32 = torch.bfloat16, torch.float32
CONFIGS = {
    "fp32 (tandem default today)": (uniform("fp32"), F32),
    "bf16 end to end": (uniform("bf16"), BF),
    "int4pack bf16, casts per matmul, head int8pack (tandem int4 today)": (uniform("int4pack_bf16", "int8pack_bf16"), F32),
    "int4pack bf16 end to end, head int8pack": (uniform("int4pack_bf16", "int8pack_bf16"), BF),
    "int4pack bf16 end to end, head bf16": (uniform("int4pack_bf16", "bf16"), BF),
    "int4pack fp32-x, head fbgemm_dyn": (uniform("int4pack_fp32", "fbgemm_dyn"), F32),
    "int4pack bf16 casts, head fbgemm_dyn": (uniform("int4pack_bf16", "fbgemm_dyn"), F32),
    "fbgemm_dyn all (int8 act, int8 w)": (uniform("fbgemm_dyn"), F32),
    "int_mm per-token all": (uniform("int_mm+quant"), F32),
    "onednn_qlinear all": (uniform("onednn_qlinear"), F32),
    "vnni all (Q4_1 layers, Q8_0 head)": (uniform("vnni_q4_1/q8_0"), F32),
    "vnni layers, head fbgemm_dyn": (uniform("vnni_q4_1/q8_0", "fbgemm_dyn"), F32),
    "noop matmuls, fp32 (the rest)": (uniform("noop"), F32),
    "noop matmuls, bf16 (the rest)": (uniform("noop"), BF),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--ctx", type=int, default=192)
    ap.add_argument("--target", type=float, default=0.5)
    args = ap.parse_args()
    model = load_model_weights()
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "", exist_ok=True)
    sel = [c for c in CONFIGS if not args.configs or any(s in c for s in args.configs.split(","))]
    for name in sel:
        kernels, dt = CONFIGS[name]
        try:
            t0 = time.time()
            mdl = Mini(model, kernels, act_dtype=dt)
            build = time.time() - t0
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: BUILD FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        row = []
        for m in [int(v) for v in args.ms.split(",")]:
            caches = mdl.new_caches(m, args.ctx)
            x = torch.randn(m, 576, dtype=dt) * 0.1
            with torch.no_grad():
                try:
                    sec = bench(lambda: mdl.decode_step(x, caches, args.ctx), target_s=args.target, repeats=5,
                                warmup=2)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} M={m}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
            row.append(f"M={m}: {sec * 1e3:7.2f} ms = {m / sec:7.1f} tok/s")
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/chain.jsonl", "a") as f:
                f.write(json.dumps({"config": name, "M": m, "ctx": args.ctx, "ms": sec * 1e3, "tok_s": m / sec,
                                    "build_s": build, "threads": torch.get_num_threads()}) + "\n")
        print(f"{name:70s} | " + " | ".join(row), flush=True)
        del mdl
        gc.collect()


if __name__ == "__main__":
    main()

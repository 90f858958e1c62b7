"""Table 3: one decoder layer's decode step (M sequences, context 192) eager vs torch.compile
(inductor, CPU), per kernel config; plus the eager op count per layer (torch.profiler) and the
cost of everything that is not a matmul (matmuls replaced by preallocated outputs: "noop").

    THREADS=2 .venv/bin/python bench/issue17_study/layer.py [--configs a,b] [--ms 1,16] [--no-compile]
    ... --whole "<config>"   also compiles the whole 30-layer decode step of one config
Writes bench/issue17_study/results/layer.jsonl (appended).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from common import bench, load_model_weights
from mini import Mini, uniform

BF, F32 = torch.bfloat16, torch.float32
CONFIGS = {
    "fp32": (uniform("fp32"), F32),
    "bf16 e2e": (uniform("bf16"), BF),
    "int4pack bf16 + casts (today)": (uniform("int4pack_bf16"), F32),
    "int4pack bf16 e2e": (uniform("int4pack_bf16"), BF),
    "int4pack fp32-x": (uniform("int4pack_fp32"), F32),
    "fbgemm_dyn": (uniform("fbgemm_dyn"), F32),
    "int_mm+quant": (uniform("int_mm+quant"), F32),
    "vnni": (uniform("vnni_q4_1/q8_0"), F32),
    "vnni_op": (uniform("vnni_op"), F32),
    "noop fp32": (uniform("noop"), F32),
    "noop bf16": (uniform("noop"), BF),
}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/layer.jsonl"


def log(rec):
    with open(OUT, "a") as f:
        f.write(json.dumps(rec) + "\n")


def op_count(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_parent is None]  # top-level ops only
    return len(events)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--ctx", type=int, default=192)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cpp-wrapper", action="store_true")
    ap.add_argument("--whole", default="")
    args = ap.parse_args()
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "", exist_ok=True)
    model = load_model_weights()
    ctx = args.ctx
    if args.cpp_wrapper:
        import torch._inductor.config as ic
        ic.cpp_wrapper = True
    sel = [c for c in CONFIGS if not args.configs or any(s == c for s in args.configs.split(","))]
    for name in sel:
        kernels, dt = CONFIGS[name]
        mdl = Mini(model, kernels, act_dtype=dt, layers=1)
        for m in [int(v) for v in args.ms.split(",")]:
            kc, vc = mdl.new_caches(m, ctx)[0]
            x = torch.randn(m, 576, dtype=dt) * 0.1
            cos, sin = mdl.cos[ctx].view(1, 1, -1), mdl.sin[ctx].view(1, 1, -1)

            def step():
                return mdl.layer_decode(0, x, cos, sin, kc, vc, ctx)
            with torch.no_grad():
                eager = bench(step, target_s=0.2)
                ops = op_count(step)
                rec = {"config": name, "M": m, "ctx": ctx, "eager_us": eager * 1e6, "top_level_ops": ops}
                if not args.no_compile and not name.startswith("noop"):
                    torch._dynamo.reset()
                    comp = torch.compile(step, dynamic=False)
                    try:
                        t0 = time.time()
                        comp()
                        rec["compile_s"] = time.time() - t0
                        rec["compiled_us"] = bench(comp, target_s=0.2) * 1e6
                        rec["cpp_wrapper"] = args.cpp_wrapper
                    except Exception as exc:  # noqa: BLE001
                        rec["compile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(rec)
            print(json.dumps(rec), flush=True)
    if args.whole:
        kernels, dt = CONFIGS[args.whole]
        mdl = Mini(model, kernels, act_dtype=dt)
        for m in [int(v) for v in args.ms.split(",")]:
            caches = mdl.new_caches(m, ctx)
            x = torch.randn(m, 576, dtype=dt) * 0.1
            with torch.no_grad():
                eager = bench(lambda: mdl.decode_step(x, caches, ctx), target_s=0.5)
                torch._dynamo.reset()
                comp = torch.compile(lambda: mdl.decode_step(x, caches, ctx), dynamic=False)
                t0 = time.time()
                try:
                    comp()
                    cs = time.time() - t0
                    compiled = bench(comp, target_s=0.5)
                    rec = {"whole_step": args.whole, "M": m, "ctx": ctx, "eager_ms": eager * 1e3,
                           "compiled_ms": compiled * 1e3, "compile_s": cs, "cpp_wrapper": args.cpp_wrapper,
                           "eager_tok_s": m / eager, "compiled_tok_s": m / compiled}
                except Exception as exc:  # noqa: BLE001
                    rec = {"whole_step": args.whole, "M": m, "eager_ms": eager * 1e3,
                           "compile_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(rec)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

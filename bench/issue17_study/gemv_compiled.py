"""Inductor-generated Q4_1 GEMV: the matmul written as plain torch ops on the GGUF's nibbles
(y = sum_g d * (q . x_g) + sum_g m * sum(x_g)), compiled (CPU, gcc) into one fused kernel that
reads the 4-bit weights once. Compared with _weight_int4pack_mm_for_cpu (bf16) on the same weights.

    THREADS=2 .venv/bin/python bench/issue17_study/gemv_compiled.py
"""
import os
import json
import time

import torch

from common import bench, build_kernel, load_model_weights


def q41_matmul(x, qs, d, m):
    """x (M, K) f32; qs (N, G, 16) uint8 (low nibble = element j, high = j + 16); d, m (N, G) f32."""
    M, K = x.shape
    N, G, _ = qs.shape
    xg = x.view(M, 1, G, 2, 16)
    lo = (qs & 15).float()
    hi = (qs >> 4).float()
    dot = (lo * xg[:, :, :, 0, :]).sum(-1) + (hi * xg[:, :, :, 1, :]).sum(-1)  # (M, N, G)
    return (dot * d).sum(-1) + (x.view(M, 1, G, 32).sum(-1) * m).sum(-1)


def main():
    model = load_model_weights()
    comp = torch.compile(q41_matmul, dynamic=False)
    out = []
    for name, key in [("q/o 576x576", "q"), ("gate/up 1536x576", "gate"), ("down 576x1536", "down")]:
        ws = [l[key] for l in model["layers"]]
        packs = []
        for w in ws:
            n, k = w.q.shape
            g = w.q.view(n, k // 32, 32)
            packs.append(((g[..., :16] | (g[..., 16:] << 4)).contiguous(), w.d.contiguous(), w.m.contiguous()))
        int4 = [build_kernel("int4pack_bf16", w.dequant(), w)[0] for w in ws]
        for M in (1, 4, 16):
            x = torch.randn(M, ws[0].q.shape[1])
            ref = x @ ws[0].dequant().T
            t0 = time.time()
            y = comp(x, *packs[0])
            cs = time.time() - t0
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            i = [0]

            def run():
                comp(x, *packs[i[0] % 30]); i[0] += 1
            t_comp = bench(run)
            xb = x.bfloat16()

            def run4():
                int4[i[0] % 30](xb); i[0] += 1
            t_int4 = bench(run4)
            rec = {"shape": name, "M": M, "inductor_us": t_comp * 1e6, "int4pack_bf16_us": t_int4 * 1e6,
                   "first_call_s": cs, "max_rel_err_vs_fp32": err}
            out.append(rec)
            print(json.dumps(rec), flush=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/gemv_compiled.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

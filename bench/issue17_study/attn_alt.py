"""Decode attention (q length 1) and RMSNorm in eager torch: SDPA (CPU flash kernel) vs plain
matmul + softmax, F.rms_norm vs a hand-written one; fp32 and bf16; M sequences, context 192.

    THREADS=1 .venv/bin/python bench/issue17_study/attn_alt.py
"""
import os
import json
import torch
import torch.nn.functional as F
from common import bench

out = []
for dt in (torch.float32, torch.bfloat16):
    for m in (1, 16, 64):
        q = torch.randn(m, 9, 1, 64, dtype=dt)
        k = torch.randn(m, 3, 193, 64, dtype=dt)
        v = torch.randn(m, 3, 193, 64, dtype=dt)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731

        def manual():
            qg = q.view(m, 3, 3, 64)  # (M, Hkv, group, D): 3 query heads share a KV head
            s = torch.matmul(qg, k.transpose(-1, -2)) * 0.125  # (M, Hkv, 3, C)
            p = torch.softmax(s.float(), dim=-1).to(dt)
            return torch.matmul(p, v)  # (M, Hkv, 3, D)
        ref = sdpa().float().view(m, 3, 3, 64)
        err = ((manual().float() - ref).abs().max() / ref.abs().max()).item()
        x = torch.randn(m, 576, dtype=dt)
        w = torch.randn(576, dtype=dt)
        rms_f = lambda: F.rms_norm(x, (576,), weight=w, eps=1e-5)  # noqa: E731

        def rms_manual():
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * w
        rec = {"dtype": str(dt), "M": m, "sdpa_us": bench(sdpa) * 1e6, "manual_attn_us": bench(manual) * 1e6,
               "manual_max_rel_err": err, "F.rms_norm_us": bench(rms_f) * 1e6, "manual_rms_us": bench(rms_manual) * 1e6}
        out.append(rec)
        print(json.dumps(rec), flush=True)
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/attn_alt.json", "w"), indent=1)

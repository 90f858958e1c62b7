"""Where the non-matmul time of one decode layer goes (matmuls replaced by preallocated outputs),
eager, fp32 and bf16, M = 1 and 16, context 192: torch.profiler table by op.

    THREADS=1 .venv/bin/python bench/issue17_study/profile_rest.py
"""
import torch
from torch.profiler import ProfilerActivity, profile
from common import load_model_weights
from mini import Mini, uniform

model = load_model_weights()
for dt in (torch.float32, torch.bfloat16):
    mdl = Mini(model, uniform("noop"), act_dtype=dt, layers=1)
    for m in (1, 16):
        kc, vc = mdl.new_caches(m, 192)[0]
        x = torch.randn(m, 576, dtype=dt)
        cos, sin = mdl.cos[192].view(1, 1, -1), mdl.sin[192].view(1, 1, -1)
        step = lambda: mdl.layer_decode(0, x, cos, sin, kc, vc, 192)  # noqa: E731
        for _ in range(20):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(100):
                step()
        print(f"=== {dt} M={m}: per-layer µs by op (100 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

"""Correctness of the VNNI kernel: against the same math in fp32 (activations rounded per 32-block,
exact dequantized weights) and against plain fp32, on real layer-0 weights and the LM head."""
import time
import torch
from common import load_model_weights, k_fake_q8_block32, rel_err
import vnni_ext

t0 = time.time()
e = vnni_ext.ext()
print(f"extension built/loaded in {time.time() - t0:.1f}s")
model = load_model_weights()
for name, src in [("gate 1536x576", model["layers"][0]["gate"]), ("down 576x1536", model["layers"][0]["down"]),
                  ("k 192x576", model["layers"][0]["k"]), ("head 49152x576 (Q8_0)", model["embed"])]:
    w = src.dequant()
    fn = vnni_ext.make(src)
    ref_q = k_fake_q8_block32(w)
    for m in (1, 3, 4, 7, 16):
        x = torch.randn(m, w.shape[1])
        y = fn(x)
        print(f"{name:24s} M={m:2d}  vs same-math fp32: max_rel={rel_err(y, ref_q(x))[0]:.2e}  "
              f"vs fp32: max_rel={rel_err(y, x @ w.T)[0]:.2e} norm_rel={rel_err(y, x @ w.T)[1]:.2e}")

"""Table 4: numerical agreement of each quantized option with fp32 (tandem's default: fp32 weights
dequantized from the GGUF's Q4_1 / Q8_0), on real text (tinyshakespeare) through the real model.

Per option: (a) one matmul (layer 15 gate_up) on its real input, (b) one decoder layer (layer 15)
on its real input, (c) the final logits of the whole model over T tokens: max |Δ| / max |ref|,
||Δ|| / ||ref||, top-1 agreement with fp32, and the perplexity of the text under each.

    THREADS=2 .venv/bin/python bench/issue17_study/accuracy.py [--tokens 256]
Writes bench/issue17_study/results/accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from common import load_model_weights, rel_err
from mini import Mini, uniform

OPTIONS = {
    # name: (kernels, activation dtype)
    "bf16 (weights+activations)": (uniform("bf16"), torch.bfloat16),
    "int4pack bf16-x, head int8pack (tandem int4 today, Q4_1 codes kept)": (uniform("int4pack_bf16", "int8pack_bf16"), torch.float32),
    "int4pack fp32-x + fp32 scales (Q4_1 exact), head fp32": (uniform("int4pack_fp32", "fp32"), torch.float32),
    "fbgemm dynamic int8 (per-tensor act), all + head": (uniform("fbgemm_dyn"), torch.float32),
    "int_mm per-token int8, all + head": (uniform("int_mm+quant"), torch.float32),
    "onednn qlinear u8s8 (per-tensor act), all + head": (uniform("onednn_qlinear"), torch.float32),
    "dyn_quant_4bit (sym int4 re-quant), head fp32": (uniform("dyn_quant_4bit", "fp32"), torch.float32),
    "int4pack bf16-x layers, head fbgemm_dyn": (uniform("int4pack_bf16", "fbgemm_dyn"), torch.float32),
    "int4pack fp32-x layers, head fbgemm_dyn": (uniform("int4pack_fp32", "fbgemm_dyn"), torch.float32),
    "vnni kernel: int8 act per 32-block x Q4_1 layers, Q8_0 head (llama.cpp's math)": (uniform("vnni_q4_1/q8_0"), torch.float32),
    "int_mm per-token layers, head vnni Q8_0": ({"qkv": "int_mm+quant", "o": "int_mm+quant", "gate_up": "int_mm+quant", "down": "int_mm+quant", "head": "vnni_q4_1/q8_0"}, torch.float32),
    "int_mm per-token qkv/o/gate_up, vnni down + head": ({"qkv": "int_mm+quant", "o": "int_mm+quant", "gate_up": "int_mm+quant", "down": "vnni_q4_1/q8_0", "head": "vnni_q4_1/q8_0"}, torch.float32),
    "vnni layers, head fbgemm_dyn": (uniform("vnni_q4_1/q8_0", "fbgemm_dyn"), torch.float32),
    "vnni layers, head bf16": (uniform("vnni_q4_1/q8_0", "bf16"), torch.float32),
    "llama.cpp-like: act int8 per 32-block (fake), exact weights": (uniform("fake_q8_block32"), torch.float32),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    from tandem.model.gguf_file import GGUFFile
    from tandem.tokenizer import Tokenizer
    from common import GGUF
    tok = Tokenizer.from_gguf(GGUFFile(GGUF).metadata)
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tandem/data/tinyshakespeare.txt")).read()[20000:40000]
    ids = torch.tensor(tok.encode(text)[: args.tokens + 1])
    inp, target = ids[:-1], ids[1:]
    model = load_model_weights()
    with torch.no_grad():
        ref = Mini(model, uniform("fp32"))
        cap = []
        ref_logits = ref.forward_full(inp, capture=cap)
        cos, sin = ref.rope_tables(len(inp))
        L = 15
        x15 = cap[L]
        ref_layer = ref.layer_full(L, x15, cos, sin)
        h15 = ref.rms(x15 + 0, ref.layers[L]["post_norm"])  # a real (post-norm-like) input for one matmul
        ref_mm = ref.layers[L]["gate_up"](h15)
        ref_ppl = torch.exp(F.cross_entropy(ref_logits, target)).item()
        results = {"tokens": len(inp), "fp32_ppl": ref_ppl, "options": {}}
        print(f"fp32 reference ppl over {len(inp)} tokens: {ref_ppl:.3f}")
        for name, (kernels, dt) in OPTIONS.items():
            if args.only and not any(s in name for s in args.only.split(";")):
                continue
            t0 = time.time()
            try:
                mdl = Mini(model, kernels, act_dtype=dt)
                c2, s2 = mdl.rope_tables(len(inp))
                mm = mdl.layers[L]["gate_up"](h15.to(dt))
                lay = mdl.layer_full(L, x15.to(dt), c2, s2)
                logits = mdl.forward_full(inp)
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                results["options"][name] = {"error": str(exc)[:300]}
                continue
            r = {
                "matmul_max_rel": rel_err(mm, ref_mm)[0], "matmul_norm_rel": rel_err(mm, ref_mm)[1],
                "layer_max_rel": rel_err(lay, ref_layer)[0], "layer_norm_rel": rel_err(lay, ref_layer)[1],
                "logits_max_rel": rel_err(logits, ref_logits)[0], "logits_norm_rel": rel_err(logits, ref_logits)[1],
                "top1_agree": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                "ppl": torch.exp(F.cross_entropy(logits, target)).item(),
            }
            r["ppl_delta_pct"] = 100 * (r["ppl"] / ref_ppl - 1)
            results["options"][name] = r
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()) + f"  ({time.time() - t0:.1f}s)",
                  flush=True)
            del mdl
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "", exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + "/accuracy.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

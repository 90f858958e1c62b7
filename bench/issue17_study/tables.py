"""Render results/*.jsonl|json as the markdown tables of REPORT.md (prints to stdout)."""
import json
import os
from collections import defaultdict

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") + ""


def jl(name):
    p = os.path.join(R, name)
    if not os.path.exists(p):
        return []
    return [json.loads(line) for line in open(p) if line.strip()]


def kernels():
    rows = jl(os.environ.get("KFILE", "kernels_1thread.jsonl"))
    last = {}
    for r in rows:  # the last measurement of each (kernel, shape, M) wins
        last[(r["kernel"], r["shape"], r["M"])] = r["us"]
    shapes = []
    for r in rows:
        if r["kernel"] != "cast_in+out" and r["shape"] not in shapes:
            shapes.append(r["shape"])
    kern = []
    for r in rows:
        if r["kernel"] != "cast_in+out" and r["kernel"] not in kern:
            kern.append(r["kernel"])
    ms = sorted({r["M"] for r in rows})
    for s in shapes:
        print(f"\n**{s}** (µs per call; 30 distinct layer weights rotated" + (")" if "head" not in s else "; one weight)"))
        print("\n| kernel | " + " | ".join(f"M={m}" for m in ms) + " |")
        print("|---|" + "---|" * len(ms))
        best = {m: min((last.get((k, s, m)) for k in kern if last.get((k, s, m)) is not None
                        and k != "int_mm_kernel"), default=None) for m in ms}
        for k in kern:
            cells = []
            for m in ms:
                v = last.get((k, s, m))
                if v is None:
                    cells.append("–")
                else:
                    t = f"{v:.0f}" if v >= 10 else f"{v:.1f}"
                    cells.append(f"**{t}**" if best[m] is not None and v == best[m] else t)
            if any(c != "–" for c in cells):
                print(f"| {k} | " + " | ".join(cells) + " |")
    casts = [r for r in rows if r["kernel"] == "cast_in+out"]
    if casts:
        print("\nCasts around one packed matmul (x fp32->bf16 and out bf16->fp32), µs:\n")
        print("| K->N | " + " | ".join(f"M={m}" for m in ms) + " |")
        print("|---|" + "---|" * len(ms))
        by = defaultdict(dict)
        for r in casts:
            by[r["shape"]][r["M"]] = r["us"]
        for s, d in by.items():
            print(f"| {s} | " + " | ".join(f"{d.get(m, float('nan')):.1f}" for m in ms) + " |")


def chain():
    rows = jl(os.environ.get("CFILE", "chain_1thread.jsonl"))
    last = {}
    for r in rows:
        last[(r["config"], r["M"])] = r
    cfgs = []
    for r in rows:
        if r["config"] not in cfgs:
            cfgs.append(r["config"])
    ms = sorted({r["M"] for r in rows})
    print("\n| config | " + " | ".join(f"M={m}: ms/step (tok/s)" for m in ms) + " |")
    print("|---|" + "---|" * len(ms))
    for c in cfgs:
        cells = []
        for m in ms:
            r = last.get((c, m))
            cells.append("–" if r is None else f"{r['ms']:.2f} ({r['tok_s']:.0f})")
        print(f"| {c} | " + " | ".join(cells) + " |")


def layer():
    rows = jl("layer.jsonl")
    print("\n| config | M | eager µs/layer | top-level ops | compiled µs/layer | compile s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "whole_step" in r:
            continue
        note = r.get("compile_error", "")[:80]
        cw = " (cpp_wrapper)" if r.get("cpp_wrapper") else ""
        comp = f"{r['compiled_us']:.0f}{cw}" if "compiled_us" in r else "–"
        cs = f"{r['compile_s']:.1f}" if "compile_s" in r else "–"
        print(f"| {r['config']} | {r['M']} | {r['eager_us']:.0f} | {r['top_level_ops']} | {comp} | {cs} | {note} |")
    whole = [r for r in rows if "whole_step" in r]
    if whole:
        print("\nWhole decode step compiled:\n")
        print("| config | M | eager ms | compiled ms | compile s | eager tok/s | compiled tok/s |")
        print("|---|---|---|---|---|---|---|")
        for r in whole:
            if "compiled_ms" in r:
                print(f"| {r['whole_step']}{' (cpp_wrapper)' if r.get('cpp_wrapper') else ''} | {r['M']} | {r['eager_ms']:.2f} | "
                      f"{r['compiled_ms']:.2f} | {r['compile_s']:.0f} | {r['eager_tok_s']:.0f} | {r['compiled_tok_s']:.0f} |")
            else:
                print(f"| {r['whole_step']} | {r['M']} | {r['eager_ms']:.2f} | failed: {r.get('compile_error', '')[:80]} | | | |")


def accuracy():
    p = os.path.join(R, "accuracy.json")
    if not os.path.exists(p):
        return
    a = json.load(open(p))
    print(f"\nReference: fp32, weights dequantized from the GGUF; {a['tokens']} tokens of tinyshakespeare; fp32 ppl {a['fp32_ppl']:.3f}\n")
    print("| option | one matmul max rel | one layer max rel | logits max rel | logits norm rel | top-1 agree | ppl | Δppl |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in a["options"].items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:60]} | | | | | | |")
            continue
        print(f"| {name} | {r['matmul_max_rel']:.2e} | {r['layer_max_rel']:.2e} | {r['logits_max_rel']:.2e} | "
              f"{r['logits_norm_rel']:.2e} | {100 * r['top1_agree']:.1f}% | {r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% |")


if __name__ == "__main__":
    print("## Kernels"); kernels()
    print("\n## Chain"); chain()
    print("\n## Layer"); layer()
    print("\n## Accuracy"); accuracy()

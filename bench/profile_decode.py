"""Where a decode step's time goes with tandem's defaults (GGUF blocks, the CPU extension's fused
layer): the engine step, split into the model's layers (their matmuls, attention and the rest of
the fused layer, each kernel timed alone on the same shapes), the LM head, and what is left
(scheduling, metadata, sampling, Python).

    .venv/bin/python bench/profile_decode.py [--batch 1 16] [--context 256] [--threads 2]

Each figure is ms per decode step (a step makes `batch` tokens), the median of --steps steps
after a warm-up, context `--context` tokens per sequence.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tandem
from tandem.engine.llm_engine import torch_on_one_thread
from tandem.kernels.cpu import ops


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def profile(llm: tandem.LLM, batch: int, context: int, steps: int) -> dict:
    engine, model = llm.engine, llm.model
    prompts = [[(17 * i + j) % 40000 + 100 for j in range(context)] for i in range(batch)]
    params = tandem.SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    while any(s.num_computed_tokens < context for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill
    step_times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - started)
    while engine.has_unfinished():
        engine.step()
    step = statistics.median(step_times) * 1e3

    # the same shapes, kernel by kernel
    kernels, c = ops(), llm.config
    layer = model.model.layers[0]
    x = torch.randn(batch, c.hidden_size)
    parts = {name: getattr(layer.self_attn if "o_proj" in name or "qkv" in name else layer.mlp, name)
             for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    matmuls = 0.0
    alone = torch_on_one_thread()  # as inside an engine step: torch's own ops on this thread
    alone.__enter__()
    for name, module in parts.items():
        inputs = torch.randn(batch, module.in_features)
        matmuls += timed(lambda m=module, v=inputs: m(v), 50)
    pools = engine.runner.k_pools[0], engine.runner.v_pools[0]
    blocks = -(-context // engine.block_manager.block_size)
    tables = torch.arange(batch * blocks).view(batch, blocks) % pools[0].data.shape[0]
    q = torch.randn(batch, c.num_heads, c.head_dim)
    attention = timed(lambda: kernels.paged_attention(q, pools[0].data, pools[1].data, tables, torch.arange(batch),
                                                      torch.zeros(batch, dtype=torch.long),
                                                      torch.full((batch,), context, dtype=torch.long)), 50)
    norms = timed(lambda: kernels.rms_norm(x, layer.input_layernorm.weight, 1e-5), 50) * 2
    head = timed(lambda: model.compute_logits(x), 20)
    alone.__exit__(None, None, None)
    layers = c.num_layers * (matmuls + attention + norms)
    return {"batch": batch, "context": context, "step_ms": step, "tokens_per_s": batch / step * 1e3,
            "layer_matmuls_ms": c.num_layers * matmuls, "attention_ms": c.num_layers * attention,
            "norms_ms": c.num_layers * norms, "lm_head_ms": head,
            "rest_ms": step - layers - head}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    llm = tandem.LLM(args.model, num_threads=args.threads, progress=False)
    print(f"quantization: {llm.quantization}, fused layer: {llm.model._ggml_layer_args() is not None}")
    print("| batch | step ms | tok/s | layer matmuls | attention | norms | LM head | rest (RoPE, KV writes, residuals, "
          "SiLU, engine, sampling) |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        r = profile(llm, batch, args.context, args.steps)
        print(f"| {batch} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['layer_matmuls_ms']:.2f} | "
              f"{r['attention_ms']:.2f} | {r['norms_ms']:.2f} | {r['lm_head_ms']:.2f} | {r['rest_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

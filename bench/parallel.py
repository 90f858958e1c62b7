"""What splitting the default model costs on this machine: one forward (no KV cache) of a
--tokens-token row, single rank against tensor parallelism 3 and pipeline parallelism 2 and 3
(gloo, one process a rank, torch threads split evenly over the cores), with the time each rank
spends in its collectives and the weights each rank holds.

    .venv/bin/python bench/parallel.py [--tokens 128] [--repeat 5] [--json bench/parallel.json]

The model math only (tandem.model.tensor_parallel / pipeline_parallel): no engine, no Ray. On a
2-core machine every split is slower than one rank; the table says by how much and where.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tandem


def timed_collectives(spent: list[float], names=("all_reduce", "all_gather", "send", "recv")) -> None:
    """Wrap the collectives the split models call so their time is counted (also bench/parallel_engine.py)."""
    for name in names:
        original = getattr(dist, name)

        def wrapper(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        setattr(dist, name, wrapper)


def _rank(rank: int, world: int, layout: str, init: str, tokens: int, repeat: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from tandem.model.pipeline_parallel import split_stage, stage_forward
    from tandem.model.tensor_parallel import shard_model

    try:
        model = tandem.LLM("smollm2-135m", progress=False, quantization="none", num_kv_blocks=16).model
        model = shard_model(model, rank, world) if layout == "tensor" else split_stage(model, rank, world)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(tokens)[None]

        def forward():
            if layout == "tensor":
                with torch.inference_mode():
                    return model.compute_logits(model(ids, positions))
            return stage_forward(model, ids, positions)

        forward()
        spent: list[float] = []
        timed_collectives(spent)
        walls = []
        for _ in range(repeat):
            dist.barrier()
            mark, start = len(spent), time.perf_counter()
            forward()
            dist.barrier()
            walls.append((time.perf_counter() - start, sum(spent[mark:])))
        wall, comm = min(walls)
        Path(f"{out}.{rank}").write_text(json.dumps({"wall_s": wall, "collectives_s": comm, "weight_bytes": weights}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads sometimes abort at interpreter exit, after the work is done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    llm = tandem.LLM("smollm2-135m", progress=False, quantization="none", num_kv_blocks=16, num_threads=cores)
    ids = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        llm.model.compute_logits(llm.model(ids, torch.arange(args.tokens)[None]))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            llm.model.compute_logits(llm.model(ids, torch.arange(args.tokens)[None]))
            times.append(time.perf_counter() - start)
    single_weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    rows = {"one rank": {"wall_s": min(times), "collectives_s": 0.0, "weight_bytes_per_rank": single_weights,
                         "threads_per_rank": cores}}
    del llm
    for layout, world in (("tensor", 3), ("pipeline", 2), ("pipeline", 3)):
        threads = max(1, cores // world)
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result"
            mp.start_processes(_rank, args=(world, layout, f"file://{tmp}/rendezvous", args.tokens, args.repeat,
                                            threads, out), nprocs=world, join=True, start_method="spawn")
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
        rows[f"{layout} {world}"] = {"wall_s": max(r["wall_s"] for r in ranks),
                                     "collectives_s": max(r["collectives_s"] for r in ranks),
                                     "weight_bytes_per_rank": max(r["weight_bytes"] for r in ranks),
                                     "threads_per_rank": threads}
    base = rows["one rank"]["wall_s"]
    print(f"| layout | forward of {args.tokens} tokens | vs one rank | in collectives (busiest rank) | "
          "weights per rank | threads per rank |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s'] * 1e3:.1f} ms | {r['wall_s'] / base:.2f}x | {r['collectives_s'] * 1e3:.1f} ms | "
              f"{r['weight_bytes_per_rank'] / 2**20:.0f} MiB | {r['threads_per_rank']} |")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "layouts": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()

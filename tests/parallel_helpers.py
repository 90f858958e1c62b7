"""Run a model split over several processes (gloo, one process a rank) and bring back the logits:
the tensor- and pipeline-parallel tests' common harness."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tandem


def _exit_now() -> None:
    """End a rank's process without running C++ static destructors: gloo's threads, torn down at
    interpreter exit, sometimes abort the process ("terminate called without an active
    exception") after its work is done and saved."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank(rank: int, world: int, layout: str, path: str, init: str, ids: torch.Tensor, out: str, options: dict):
    from tandem.model.expert_parallel import shard_experts
    from tandem.model.pipeline_parallel import split_stage, stage_forward
    from tandem.model.tensor_parallel import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        llm = tandem.LLM(path, dtype="float32", progress=False, num_kv_blocks=16, block_size=4, **options)
        positions = torch.arange(ids.shape[1])[None]
        if layout == "tensor":
            model = shard_model(llm.model, rank, world)
            with torch.inference_mode():
                logits, mine = model.compute_logits(model(ids, positions)), rank == 0
        elif layout == "expert":  # each rank its own row of ids: data-parallel attention
            model = shard_experts(llm.model, rank, world)
            with torch.inference_mode():
                logits, mine = model.compute_logits(model(ids[rank:rank + 1], positions)), True
            out = f"{out}.{rank}"
        else:
            logits, mine = stage_forward(split_stage(llm.model, rank, world), ids, positions), rank == world - 1
            assert (logits is not None) == mine
        if mine:
            torch.save(logits, out)
        dist.barrier()  # no rank tears down gloo while a peer's last send is in flight (SIGABRT)
    finally:
        dist.destroy_process_group()
    _exit_now()


def split_logits(layout: str, path, world: int, ids: torch.Tensor, tmp_path, **options) -> torch.Tensor:
    """The logits of `ids` (no cache) with the model split over `world` processes: layout "tensor"
    (tandem.model.tensor_parallel) or "pipeline" (pipeline_parallel) for one row of ids; "expert"
    (expert_parallel) for `world` rows, one a rank, the logits stacked."""
    out, init = str(tmp_path / f"logits-{layout}{world}.pt"), f"file://{tmp_path / f'rendezvous-{layout}{world}'}"
    mp.start_processes(_rank, args=(world, layout, str(path), init, ids, out, options), nprocs=world, join=True,
                       start_method="spawn")
    if layout == "expert":
        return torch.cat([torch.load(f"{out}.{rank}") for rank in range(world)])
    return torch.load(out)


def single_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with torch.inference_mode():
        return llm.model.compute_logits(llm.model(ids, torch.arange(ids.shape[1])[None]))

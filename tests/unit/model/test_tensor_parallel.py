"""Tensor parallelism of the decoder (tandem.model.tensor_parallel) over gloo, one process a rank:
the logits of the sharded model equal the single-rank model's within float tolerance (the only
difference is the order of the all-reduce's sums: 1e-5 relative), for a dense tiny Llama with KV
heads split and with KV heads replicated, and for tiny Qwen2-MoE / Mixtral models (experts split by
their intermediate size)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tandem
from tandem.errors import ConfigError
from tandem.model.tensor_parallel import shard_model
from tests.tiny_models import write_tiny_moe_dir


def _rank(rank: int, world: int, path: str, init: str, ids: torch.Tensor, out: str, options: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        llm = tandem.LLM(path, dtype="float32", progress=False, num_kv_blocks=16, block_size=4, **options)
        model = shard_model(llm.model, rank, world)
        with torch.inference_mode():
            logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def sharded_logits(path, world: int, ids: torch.Tensor, tmp_path, **options) -> torch.Tensor:
    """Rank 0's logits of `ids` (one row, no cache) with the model split over `world` processes."""
    out = str(tmp_path / f"logits-{world}.pt")
    init = f"file://{tmp_path / f'rendezvous-{world}'}"
    mp.start_processes(_rank, args=(world, str(path), init, ids, out, options), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out)


def _single(path, ids):
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with torch.inference_mode():
        return llm.model.compute_logits(llm.model(ids, torch.arange(ids.shape[1])[None]))


@pytest.mark.parametrize("world", [2, 4], ids=["kv-heads-split", "kv-heads-replicated"])
def test_dense_model_sharded_gives_the_single_rank_logits(tiny_hf_dir, tmp_path, world):
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sharded_logits(tiny_hf_dir, world, ids, tmp_path), _single(tiny_hf_dir, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_model_sharded_gives_the_single_rank_logits(tmp_path, arch):
    path, _ = write_tiny_moe_dir(tmp_path, arch)
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sharded_logits(path, 2, ids, tmp_path), _single(path, ids), rtol=1e-5, atol=1e-5)


def test_a_world_the_heads_cannot_take_is_refused(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide"):
        shard_model(llm.model, 0, 3)

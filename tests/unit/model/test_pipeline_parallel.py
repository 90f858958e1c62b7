"""Pipeline parallelism of the decoder (tandem.model.pipeline_parallel) over gloo, one process a
stage: the last stage's logits are the single-rank model's (the same ops, in order; only BLAS's
blocking differs between thread counts, so within 1e-6), for a tiny Llama and a tiny Qwen2-MoE in
2 stages."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tandem
from tandem.errors import ConfigError
from tandem.model.pipeline_parallel import split_stage, stage_forward
from tests.tiny_models import write_tiny_moe_dir


def _stage(rank: int, stages: int, path: str, init: str, ids: torch.Tensor, out: str, options: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=stages)
    try:
        llm = tandem.LLM(path, dtype="float32", progress=False, num_kv_blocks=16, block_size=4, **options)
        model = split_stage(llm.model, rank, stages)
        logits = stage_forward(model, ids, torch.arange(ids.shape[1])[None])
        if rank == stages - 1:
            torch.save(logits, out)
        else:
            assert logits is None
    finally:
        dist.destroy_process_group()


def staged_logits(path, stages: int, ids: torch.Tensor, tmp_path, **options) -> torch.Tensor:
    """The last stage's logits of `ids` (one row, no cache) with the layers split over `stages` processes."""
    out = str(tmp_path / f"logits-pp{stages}.pt")
    init = f"file://{tmp_path / f'rendezvous-pp{stages}'}"
    mp.start_processes(_stage, args=(stages, str(path), init, ids, out, options), nprocs=stages, join=True,
                       start_method="spawn")
    return torch.load(out)


def _single(path, ids):
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with torch.inference_mode():
        return llm.model.compute_logits(llm.model(ids, torch.arange(ids.shape[1])[None]))


@pytest.mark.parametrize("stages", [2])
def test_dense_model_in_stages_gives_the_single_rank_logits(tiny_hf_dir, tmp_path, stages):
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(staged_logits(tiny_hf_dir, stages, ids, tmp_path), _single(tiny_hf_dir, ids),
                               rtol=1e-6, atol=1e-6)


def test_moe_model_in_stages_gives_the_single_rank_logits(tmp_path):
    path, _ = write_tiny_moe_dir(tmp_path, "qwen2_moe")
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(staged_logits(path, 2, ids, tmp_path), _single(path, ids), rtol=1e-6, atol=1e-6)


def test_stages_beyond_the_layers_are_refused(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="pipeline_parallel_size 3 exceeds"):
        split_stage(llm.model, 0, 3)  # the tiny model has 2 layers

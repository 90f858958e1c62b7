"""Tensor parallelism of the decoder (tandem.model.tensor_parallel) over gloo, one process a rank:
the logits of the sharded model equal the single-rank model's within float tolerance (the only
difference is the order of the all-reduce's sums: 1e-5 relative), for a dense tiny Llama with KV
heads split and with KV heads replicated, and for tiny Qwen2-MoE / Mixtral models (experts split by
their intermediate size)."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tandem.model.tensor_parallel import shard_model
from tests.parallel_helpers import single_logits, split_logits
from tests.tiny_models import write_tiny_moe_dir


@pytest.mark.parametrize("world", [2, 4], ids=["kv-heads-split", "kv-heads-replicated"])
def test_dense_model_sharded_gives_the_single_rank_logits(tiny_hf_dir, tmp_path, world):
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    got = split_logits("tensor", tiny_hf_dir, world, ids, tmp_path)
    torch.testing.assert_close(got, single_logits(tiny_hf_dir, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_model_sharded_gives_the_single_rank_logits(tmp_path, arch):
    path, _ = write_tiny_moe_dir(tmp_path, arch)
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    got = split_logits("tensor", path, 2, ids, tmp_path)
    torch.testing.assert_close(got, single_logits(path, ids), rtol=1e-5, atol=1e-5)


def test_a_world_the_heads_cannot_take_is_refused(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide"):
        shard_model(llm.model, 0, 3)

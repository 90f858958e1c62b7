"""Pipeline parallelism of the decoder (tandem.model.pipeline_parallel) over gloo, one process a
stage: the last stage's logits are the single-rank model's (the same ops, in order; only BLAS's
blocking differs between thread counts, so within 1e-6), for a tiny Llama and a tiny Qwen2-MoE in
2 stages."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tandem.model.pipeline_parallel import split_stage
from tests.parallel_helpers import single_logits, split_logits
from tests.tiny_models import write_tiny_moe_dir


def test_dense_model_in_stages_gives_the_single_rank_logits(tiny_hf_dir, tmp_path):
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    got = split_logits("pipeline", tiny_hf_dir, 2, ids, tmp_path)
    torch.testing.assert_close(got, single_logits(tiny_hf_dir, ids), rtol=1e-6, atol=1e-6)


def test_moe_model_in_stages_gives_the_single_rank_logits(tmp_path):
    path, _ = write_tiny_moe_dir(tmp_path, "qwen2_moe")
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    got = split_logits("pipeline", path, 2, ids, tmp_path)
    torch.testing.assert_close(got, single_logits(path, ids), rtol=1e-6, atol=1e-6)


def test_stages_beyond_the_layers_are_refused(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="pipeline_parallel_size 3 exceeds"):
        split_stage(llm.model, 0, 3)  # the tiny model has 2 layers

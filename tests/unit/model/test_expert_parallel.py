"""Expert parallelism (tandem.model.expert_parallel) over gloo, one process a rank, each rank its
own tokens: the experts split 2 ways with all-to-all dispatch and combine give every rank the logits
the unsplit model gives its tokens (fp32; 1e-5: the experts' matmuls see other row counts), for
tiny Mixtral, Qwen2-MoE (with its shared expert) and OLMoE models."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tandem.model.expert_parallel import shard_experts
from tests.parallel_helpers import single_logits, split_logits
from tests.tiny_models import write_tiny_moe_dir


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_each_rank_gets_the_unsplit_models_logits_for_its_tokens(tmp_path, arch):
    path, _ = write_tiny_moe_dir(tmp_path, arch)
    ids = torch.randint(3, 320, (2, 18), generator=torch.Generator().manual_seed(5))
    got = split_logits("expert", path, 2, ids, tmp_path)
    ref = torch.cat([single_logits(path, ids[r:r + 1]) for r in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_dense_model_or_an_uneven_split_is_refused(tiny_hf_dir, tmp_path):
    dense = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="no experts"):
        shard_experts(dense.model, 0, 2)
    path, _ = write_tiny_moe_dir(tmp_path, "mixtral")
    moe = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=16, block_size=4)
    with pytest.raises(ConfigError, match="expert_parallel_size 3 does not divide the 4 experts"):
        shard_experts(moe.model, 0, 3)

"""tandem.parallel: which layouts a model can take (refused by name otherwise) and what each rank
holds; `tandem model info` prints the plan."""
from __future__ import annotations

import pytest

from tandem.config import ModelConfig, MoEConfig
from tandem.errors import ConfigError
from tandem.parallel import ParallelConfig

# the default model's shape (SmolLM2-135M: 9 query heads, 3 KV heads, 30 layers)
SMOL = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, max_position=8192, tie_word_embeddings=True, name="smol")
MIXTRAL_LIKE = ModelConfig(architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, max_position=32768, name="mixtral",
                           moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=14336))


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=3), dict(pipeline_parallel_size=2),
                                    dict(pipeline_parallel_size=3),
                                    dict(tensor_parallel_size=3, pipeline_parallel_size=2)])
def test_the_default_models_layouts_of_the_issue_are_accepted(layout):
    ParallelConfig(**layout).check(SMOL)


@pytest.mark.parametrize("layout, message", [
    (dict(tensor_parallel_size=2), "tensor_parallel_size 2 does not divide smol's 9 attention heads"),
    (dict(tensor_parallel_size=4), "does not divide smol's 9 attention heads"),
    (dict(pipeline_parallel_size=31), "pipeline_parallel_size 31 exceeds smol's 30 layers"),
    (dict(expert_parallel_size=2), "expert_parallel_size 2: smol has no experts"),
    (dict(tensor_parallel_size=9), "tensor_parallel_size 9 does not divide smol's intermediate size 1536"),
])
def test_layouts_the_model_cannot_take_are_refused_by_name(layout, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**layout).check(SMOL)


def test_sizes_must_be_positive_integers():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        ParallelConfig(pipeline_parallel_size=True)


def test_one_rank_holds_the_whole_model():
    plan = ParallelConfig().rank_memory(SMOL, 4)
    assert plan["weight_bytes"] == pytest.approx(SMOL.num_params() * 4, rel=1e-9)
    assert plan["kv_bytes_per_token"] == SMOL.kv_bytes_per_token(4)


def test_tensor_and_pipeline_parallel_ranks_hold_their_share():
    whole = ParallelConfig().rank_memory(SMOL, 4)
    tp3 = ParallelConfig(tensor_parallel_size=3).rank_memory(SMOL, 4)
    assert tp3["kv_heads"] == 1 and tp3["query_heads"] == 3
    assert tp3["kv_bytes_per_token"] == whole["kv_bytes_per_token"] / 3
    assert whole["weight_bytes"] / 3 < tp3["weight_bytes"] < whole["weight_bytes"] / 2.9  # norms replicated
    gqa = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
                      num_heads=8, num_kv_heads=2, max_position=512)
    tp2, tp4 = (ParallelConfig(tensor_parallel_size=t).rank_memory(gqa, 4) for t in (2, 4))
    assert tp2["kv_heads"] == 1 and tp4["kv_heads"] == 1  # 4 ranks, 2 KV heads: each replicated twice
    assert tp4["kv_bytes_per_token"] == tp2["kv_bytes_per_token"]
    with pytest.raises(ConfigError, match="neither divides"):
        ParallelConfig(tensor_parallel_size=4).check(ModelConfig(
            architecture="llama", vocab_size=1000, hidden_size=384, intermediate_size=512, num_layers=4,
            num_heads=12, num_kv_heads=6, max_position=512))  # 4 ranks: 6 KV heads neither split nor replicate
    pp2 = ParallelConfig(pipeline_parallel_size=2).rank_memory(SMOL, 4)
    assert pp2["layers"] == 15 and pp2["kv_bytes_per_token"] == whole["kv_bytes_per_token"] / 2
    assert ParallelConfig(pipeline_parallel_size=4).stage_layers(30) == [range(0, 8), range(8, 16), range(16, 23),
                                                                         range(23, 30)]


def test_expert_parallelism_splits_the_experts():
    tp2 = ParallelConfig(tensor_parallel_size=2).rank_memory(MIXTRAL_LIKE, 2)
    ep2 = ParallelConfig(tensor_parallel_size=2, expert_parallel_size=2).rank_memory(MIXTRAL_LIKE, 2)
    assert ep2["experts"] == 4 and tp2["experts"] == 8
    assert ep2["weight_bytes"] == pytest.approx(tp2["weight_bytes"], rel=1e-6)  # the same share, cut another way
    ep2_alone = ParallelConfig(expert_parallel_size=2)  # the attention whole on each of 2 ranks
    assert ep2_alone.world_size == 2 and ep2_alone.rank_memory(MIXTRAL_LIKE, 2)["experts"] == 4
    assert ep2_alone.rank_memory(MIXTRAL_LIKE, 2)["weight_bytes"] > ep2["weight_bytes"]
    with pytest.raises(ConfigError, match="expert_parallel_size 3 does not divide mixtral's 8 experts"):
        ParallelConfig(expert_parallel_size=3).check(MIXTRAL_LIKE)
    with pytest.raises(ConfigError, match="the two must be equal"):
        ParallelConfig(tensor_parallel_size=2, expert_parallel_size=4).check(MIXTRAL_LIKE)


def test_model_info_prints_the_plan_per_rank_and_refuses_bad_sizes(tiny_gguf, capsys):
    from tandem.cli import main

    assert main(["model", "info", str(tiny_gguf), "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                 "--memory-per-rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "tensor 2 x pipeline 2 = 4 ranks" in out and "1 layers, 2 query heads, 1 key/value heads" in out
    assert "weights per rank" in out and "KV tokens that fit in 1 GiB a rank" in out
    assert main(["model", "info", str(tiny_gguf), "--tensor-parallel-size", "3"]) == 2
    assert "tensor_parallel_size 3 does not divide" in capsys.readouterr().err

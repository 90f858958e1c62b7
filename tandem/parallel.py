"""How a model is split across ranks: tensor parallelism (Megatron-LM: each layer's heads and
feed-forward columns split over T ranks), pipeline parallelism (the layers split into P stages) and
expert parallelism (an MoE layer's experts split over E ranks), and what each rank then holds.

`ParallelConfig.check(model)` refuses a layout the model cannot take, naming the size and the
dimension that does not divide; `rank_memory` is the plan `tandem model info` prints. The split
follows what vLLM and Megatron do: q/k/v and gate/up by output columns, o and down by input rows;
KV heads split when T divides them, replicated (each rank one KV head) when T is a multiple of
their count; the vocabulary split for the embedding and the LM head. An MoE layer's experts are
either each split by T (tensor parallelism alone) or whole, num_experts / E on each rank (expert
parallelism, on the tensor-parallel ranks, or on E ranks that run the attention whole).
"""
from __future__ import annotations

from dataclasses import dataclass

from tandem.config import ModelConfig
from tandem.errors import ConfigError


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: T, or E when only the experts are split (E > 1 = T: the
        attention then runs whole on each of the E ranks). Expert parallelism reuses the
        tensor-parallel ranks, so T and E are equal where both exceed 1."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @property
    def world_size(self) -> int:
        """Ranks a replica needs: the stage size times P."""
        return self.stage_size * self.pipeline_parallel_size

    def rank_of(self, stage: int, index: int) -> int:
        """The global rank of a stage's index-th rank (the stages' ranks are consecutive)."""
        return stage * self.stage_size + index

    def check(self, model: ModelConfig) -> None:
        """ConfigError naming what does not divide, for a layout this model cannot take."""
        t, p, e = self.tensor_parallel_size, self.pipeline_parallel_size, self.expert_parallel_size
        name = model.name or model.architecture
        if model.num_heads % t:
            raise ConfigError(f"tensor_parallel_size {t} does not divide {name}'s {model.num_heads} attention heads")
        kv = model.num_kv_heads
        if kv % t and t % kv:
            raise ConfigError(f"tensor_parallel_size {t} neither divides {name}'s {kv} key/value heads nor is a "
                              f"multiple of them (to replicate one a rank)")
        dense = [i for i in range(model.num_layers) if model.moe is None or not model.moe.is_sparse(i)]
        if dense and model.intermediate_size % t:
            raise ConfigError(f"tensor_parallel_size {t} does not divide {name}'s intermediate size "
                              f"{model.intermediate_size}")
        if p > model.num_layers:
            raise ConfigError(f"pipeline_parallel_size {p} exceeds {name}'s {model.num_layers} layers")
        m = model.moe
        if e > 1 and m is None:
            raise ConfigError(f"expert_parallel_size {e}: {name} has no experts")
        if e > 1 and t > 1 and e != t:
            raise ConfigError(f"expert_parallel_size {e} with tensor_parallel_size {t}: expert parallelism places "
                              "the experts on the tensor-parallel ranks, so the two must be equal (or one of them 1)")
        if t > 1 and model.qk_norm == "full":
            raise ConfigError(f"tensor_parallel_size {t}: {name} normalises its whole q and k projections "
                              "(OLMoE), which needs every head on one rank; use expert_parallel_size instead")
        if m is not None:
            if m.num_experts % e:
                raise ConfigError(f"expert_parallel_size {e} does not divide {name}'s {m.num_experts} experts")
            if e == 1 and m.expert_intermediate_size % t:
                raise ConfigError(f"tensor_parallel_size {t} does not divide {name}'s expert intermediate size "
                                  f"{m.expert_intermediate_size}")
            if m.shared_expert_intermediate_size % t:
                raise ConfigError(f"tensor_parallel_size {t} does not divide {name}'s shared expert size "
                                  f"{m.shared_expert_intermediate_size}")

    def kv_heads_per_rank(self, model: ModelConfig) -> int:
        """KV heads each rank holds: its share, or one (replicated) when the ranks outnumber them."""
        return max(model.num_kv_heads // self.tensor_parallel_size, 1)

    def stage_layers(self, num_layers: int) -> list[range]:
        """The layers of each pipeline stage: as even as possible, the earlier stages one longer."""
        p = self.pipeline_parallel_size
        base, extra = divmod(num_layers, p)
        bounds, start = [], 0
        for stage in range(p):
            size = base + (stage < extra)
            bounds.append(range(start, start + size))
            start += size
        return bounds

    def rank_memory(self, model: ModelConfig, dtype_bytes: int) -> dict[str, float]:
        """Per rank of the busiest stage (the first: it holds the embedding and the most layers):
        weight bytes, KV bytes per token, and the split it holds (heads, KV heads, experts)."""
        self.check(model)
        t, e = self.tensor_parallel_size, self.expert_parallel_size
        d, hd, c = model.hidden_size, model.head_dim, model
        kv_heads = self.kv_heads_per_rank(c)
        stages = self.stage_layers(c.num_layers)
        embed = c.vocab_size * d / t

        def layer_params(i: int) -> float:
            attn = d * hd * 2 * c.num_heads / t + d * hd * 2 * kv_heads + 2 * d
            m = c.moe
            if m is None or not m.is_sparse(i):
                return attn + 3 * d * c.intermediate_size / t
            # E > 1: whole experts, num_experts / E a rank; else every expert split over the T ranks
            experts = m.num_experts // e * 3 * d * m.expert_intermediate_size / (1 if e > 1 else t)
            shared = 3 * d * m.shared_expert_intermediate_size / t + (d if m.shared_expert_intermediate_size else 0)
            return attn + experts + shared + d * m.num_experts

        per_stage = []
        for index, layers in enumerate(stages):
            params = sum(layer_params(i) for i in layers)
            if index == 0:
                params += embed
            if index == len(stages) - 1:
                params += d + (0 if c.tie_word_embeddings and len(stages) == 1 else embed)
            per_stage.append(params)
        busiest = max(range(len(stages)), key=lambda s: per_stage[s])
        return {"weight_bytes": per_stage[busiest] * dtype_bytes,
                "kv_bytes_per_token": 2 * len(stages[busiest]) * kv_heads * hd * dtype_bytes,
                "layers": len(stages[busiest]), "query_heads": c.num_heads // t, "kv_heads": kv_heads,
                "experts": c.moe.num_experts // e if c.moe else 0, "ranks": self.world_size}

"""Pipeline parallelism of the decoder (GPipe, Huang et al. 2019): the layers split into stages,
one a rank, the hidden states passed from stage to stage with torch.distributed send/recv.

`split_stage(model, stage, num_stages)` keeps stage `stage`'s layers (tandem.parallel's split: as
even as possible, the earlier stages one longer), the embedding on the first stage and the final
norm and LM head on the last; `stage_forward` runs one stage of a forward without a KV cache.
The result is the single-rank model's: the same ops on the same tensors in the same order, up to
BLAS's blocking (tests/unit/model/test_pipeline_parallel.py). What runs the stages (Ray actors, micro-batches of the
continuous batch so that stages overlap, each stage's KV cache) is not here yet.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tandem.parallel import ParallelConfig


def split_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """Stage `stage` of `num_stages`'s share of a loaded model, in place."""
    layout = ParallelConfig(pipeline_parallel_size=num_stages)
    layout.check(model.config)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of the {num_stages} stages")
    layers = layout.stage_layers(model.config.num_layers)[stage]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in layers)
    model.stage, model.num_stages, model.stage_layers = stage, num_stages, layers
    if stage > 0:
        model.model.embed_tokens = None  # a tied head keeps its weight through lm_head
    if stage < num_stages - 1:
        model.lm_head, model.model.norm = None, None
    return model


@torch.inference_mode()
def stage_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                  group=None) -> torch.Tensor | None:
    """One forward (no KV cache) through this rank's stage: the first stage embeds input_ids, each
    stage receives the previous stage's hidden states and sends its own to the next; the last
    returns the logits (B, T, vocab), the others None. Ranks in `group` are the stages in order."""
    stage, last = model.stage, model.num_stages - 1
    rotary = model.rope.tables(positions, next(model.parameters()).dtype)
    if stage == 0:
        x = model.model.embed_tokens(input_ids)
    else:
        x = torch.empty(*input_ids.shape, model.config.hidden_size, dtype=next(model.parameters()).dtype)
        dist.recv(x, src=_rank_of(stage - 1, group), group=group)
    for layer in model.model.layers:
        x = layer(x, rotary, None)
    if stage < last:
        dist.send(x.contiguous(), dst=_rank_of(stage + 1, group), group=group)
        return None
    return model.compute_logits(model.model.norm(x))


def _rank_of(stage: int, group) -> int:
    return stage if group is None else dist.get_global_rank(group, stage)

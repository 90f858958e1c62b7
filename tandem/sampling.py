"""Batched logits processing and token selection: one call for the whole batch, per-row parameters.

Each filter is a pure function (B, V) -> (B, V) that writes -inf where a token is excluded;
`sample` applies them in the documented order (see SamplingParams) and draws with each request's
own seeded generator, so a seed reproduces a request whatever else is in the batch.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tandem.sampling_params import GREEDY_TEMPERATURE, SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A request's private RNG; an unseeded request gets a random seed from the OS."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def apply_repetition_penalty(logits: torch.Tensor, histories: Sequence[Sequence[int]],
                             penalties: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on every token seen in prompt or output:
    positive logits are divided by the penalty, negative ones multiplied."""
    out = logits.clone()
    for row, (seen, penalty) in enumerate(zip(histories, penalties.tolist())):
        if penalty == 1.0 or not seen:
            continue
        ids = torch.tensor(sorted(set(seen)), dtype=torch.long)
        values = out[row, ids]
        out[row, ids] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Divide by temperature; greedy rows (temperature below GREEDY_TEMPERATURE) are left as they are."""
    safe = torch.where(temperatures >= GREEDY_TEMPERATURE, temperatures, torch.ones_like(temperatures))
    return logits / safe.unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (k = 0: keep all). Ties at the k-th value are kept."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).unsqueeze(1))  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass reaches p. The most likely token always stays; rows with p = 1 are untouched
    (fp32 cumulative sums reach 1.0 before the tail, so they must not be filtered at all)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Apply every active filter to fp32 logits (B, V), in SamplingParams' documented order."""
    def column(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype)

    if any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, histories, column("repetition_penalty"))
    if any(not p.greedy for p in params):
        logits = apply_temperature(logits, column("temperature"))
    if any(p.top_k > 0 for p in params):
        logits = apply_top_k(logits, column("top_k", torch.long))
    if any(p.top_p < 1.0 for p in params):
        logits = apply_top_p(logits, column("top_p"))
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, column("min_p"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
           histories: Sequence[Sequence[int]]) -> list[int]:
    """One next token per row: argmax for greedy rows, a draw from the filtered distribution otherwise."""
    processed = process_logits(logits.float(), params, histories)
    chosen = processed.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            probs = processed[row].softmax(dim=-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=generators[row]))
    return chosen

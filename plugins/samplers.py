"""Built-in samplers (logits processors): logit bias, repetition / presence / frequency penalties,
temperature, top-k, top-p, min-p. Each is a batched pure function (B, V) -> (B, V) that writes
-inf where a token is excluded, wrapped in a LogitsProcessor that reads its per-request value
from SamplingParams. They register through `tandem_logits_processors` like any plugin.

Order (lower runs first): logit_bias 100, repetition_penalty 200, presence_frequency_penalty
300, temperature 400, [plugins: 450 by default], top_k 500, top_p 600, min_p 700 (vLLM's order:
biases and penalties act on raw logits, truncation on the tempered distribution).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.errors import InvalidRequestError
from tandem.plugins import hookimpl
from tandem.sampling import LogitsProcessor, SamplingBatch
from tandem.sampling_params import GREEDY_TEMPERATURE, SamplingParams


# -- the filters ------------------------------------------------------------------------------

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


def apply_presence_frequency(logits: torch.Tensor, outputs: Sequence[Sequence[int]],
                             presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties over generated tokens: logit -= presence * [count > 0] + frequency * count."""
    counts = torch.zeros_like(logits)
    for row, ids in enumerate(outputs):
        if ids:
            counts[row].index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids)))
    return logits - presence.unsqueeze(1) * (counts > 0) - frequency.unsqueeze(1) * counts


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


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    out = logits.clone()
    for row, bias in enumerate(biases):
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long)
            out[row, ids] += torch.tensor(list(bias.values()), dtype=out.dtype)
    return out


# -- the processors ---------------------------------------------------------------------------

def _column(args: list, neutral: float, dtype=torch.float32) -> torch.Tensor:
    """Per-row values with the neutral value where a row's argument is None."""
    return torch.tensor([neutral if a is None else a for a in args], dtype=dtype)


class LogitBias(LogitsProcessor):
    name, order = "logit_bias", 100

    def parse(self, params: SamplingParams, vocab_size: int):
        if not params.logit_bias:
            return None
        bad = [t for t in params.logit_bias if t >= vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias has token ids outside the vocabulary of {vocab_size}: {bad[:5]}")
        return dict(params.logit_bias)

    def __call__(self, logits, args, batch):
        return apply_logit_bias(logits, args)


class RepetitionPenalty(LogitsProcessor):
    name, order = "repetition_penalty", 200

    def parse(self, params, vocab_size):
        return None if params.repetition_penalty == 1.0 else params.repetition_penalty

    def __call__(self, logits, args, batch):
        return apply_repetition_penalty(logits, batch.token_ids, _column(args, 1.0))


class PresenceFrequencyPenalty(LogitsProcessor):
    name, order = "presence_frequency_penalty", 300

    def parse(self, params, vocab_size):
        if params.presence_penalty == 0.0 and params.frequency_penalty == 0.0:
            return None
        return params.presence_penalty, params.frequency_penalty

    def __call__(self, logits, args, batch):
        presence = _column([None if a is None else a[0] for a in args], 0.0)
        frequency = _column([None if a is None else a[1] for a in args], 0.0)
        outputs = [batch.output_ids(row) if a is not None else () for row, a in enumerate(args)]
        return apply_presence_frequency(logits, outputs, presence, frequency)


class Temperature(LogitsProcessor):
    name, order = "temperature", 400

    def parse(self, params, vocab_size):
        return None if params.greedy or params.temperature == 1.0 else params.temperature

    def __call__(self, logits, args, batch):
        return apply_temperature(logits, _column(args, 1.0))


class TopK(LogitsProcessor):
    name, order = "top_k", 500

    def parse(self, params, vocab_size):
        return params.top_k if 0 < params.top_k < vocab_size and not params.greedy else None

    def __call__(self, logits, args, batch):
        return apply_top_k(logits, _column(args, 0, torch.long))


class TopP(LogitsProcessor):
    name, order = "top_p", 600

    def parse(self, params, vocab_size):
        return params.top_p if params.top_p < 1.0 and not params.greedy else None

    def __call__(self, logits, args, batch):
        return apply_top_p(logits, _column(args, 1.0))


class MinP(LogitsProcessor):
    name, order = "min_p", 700

    def parse(self, params, vocab_size):
        return params.min_p if params.min_p > 0.0 and not params.greedy else None

    def __call__(self, logits, args, batch):
        return apply_min_p(logits, _column(args, 0.0))


BUILTIN_PROCESSORS = (LogitBias, RepetitionPenalty, PresenceFrequencyPenalty, Temperature, TopK, TopP, MinP)


@hookimpl
def tandem_logits_processors(api_version: int) -> list[type[LogitsProcessor]]:
    return list(BUILTIN_PROCESSORS)


__all__ = ["BUILTIN_PROCESSORS", "SamplingBatch", "apply_logit_bias", "apply_min_p", "apply_presence_frequency",
           "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p"]

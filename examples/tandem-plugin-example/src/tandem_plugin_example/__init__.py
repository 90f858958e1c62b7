"""An example tandem plugin: one sampler, one attention variant and one quantizer.

- typical_p (sampler): locally typical sampling (Meister et al. 2023): keep the tokens whose
  surprisal is closest to the distribution's entropy until their mass reaches `mass`.
- chunked (attention variant): Llama-4-style chunked local attention: a query sees only the
  keys of its own `chunk`-token chunk; old chunks' KV blocks are freed as generation moves on.
- int8_tensor (quantizer): int8 weights with one absmax scale for the whole tensor, dequantized
  per forward (simple and small, not fast: a teaching example).

tandem finds this module through the entry point in pyproject.toml and calls the @hookimpl
functions below once, when it loads plugins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import ConfigError, InvalidRequestError
from tandem.plugins import AttentionVariant, KVRetention, LogitsProcessor, Quantizer, hookimpl


class TypicalP(LogitsProcessor):
    name = "typical_p"
    order = 450  # after temperature, before top-k
    example_args = {"mass": 0.9}  # what tandem.plugins.testing turns it on with

    def validate(self, mass: float = 0.9):
        if not isinstance(mass, (int, float)) or isinstance(mass, bool) or not 0 < mass <= 1:
            raise InvalidRequestError(f"typical_p: mass must be a number in (0, 1], got {mass!r}")
        return float(mass)

    def __call__(self, logits, args, batch):
        rows = [i for i, a in enumerate(args) if a is not None]
        out = logits.clone()
        sub = logits[rows]  # (R, V)
        log_probs = sub.log_softmax(dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(neginf=0.0)).sum(dim=-1, keepdim=True)
        distance = (-log_probs - entropy).abs()  # how atypical each token is
        order = distance.argsort(dim=-1)
        mass_before = probs.gather(-1, order).cumsum(dim=-1) - probs.gather(-1, order)
        masses = torch.tensor([args[i] for i in rows]).unsqueeze(1)
        drop_sorted = mass_before >= masses  # the most typical token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out[rows] = sub.masked_fill(drop, float("-inf"))
        return out


class Chunked(AttentionVariant):
    name = "chunked"
    example_options = {"chunk": 8}

    def __init__(self, chunk: int = 256):
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError(f"chunked attention: chunk must be a positive integer, got {chunk!r}")
        self.chunk = chunk

    def allowed(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (k_pos // self.chunk == q_pos // self.chunk)

    def retention(self):
        # a query sees at most `chunk` keys back, so anything older can go (conservative within a chunk)
        return KVRetention(num_sink=0, window=self.chunk)


class DequantInt8(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, (self.qweight.float() * self.scale).to(x.dtype))


class Int8PerTensor(Quantizer):
    name = "int8_tensor"

    def quantize(self, weight):
        scale = (weight.abs().max() / 127).clamp(min=1e-12)
        return DequantInt8((weight / scale).round().clamp(-127, 127).to(torch.int8), scale)


@hookimpl
def tandem_logits_processors():
    return [TypicalP]


@hookimpl
def tandem_attention_variants():
    return [Chunked]


@hookimpl
def tandem_quantizers(api_version):
    if api_version < 1:
        return []
    return [Int8PerTensor]

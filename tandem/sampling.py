"""Batched token selection through a pipeline of logits processors (plugins).

A `LogitsProcessor` rewrites fp32 logits (B, V) for the rows whose request turned it on, in one
call for the whole batch. The `SamplerPipeline` runs the processors in their `order` and then
draws: argmax for greedy rows, otherwise a draw from softmax(logits) with each request's own
seeded generator, so a seed reproduces a request whatever else is in the batch. A row whose
logits leave no valid distribution (NaN, or nothing finite) fails alone; the others still draw.

A request's randomness is addressed by output position (`RandomStream`), not consumed from one
stateful generator: a request resumed at token i, on another worker after a migration or on the
decode worker after prefill, draws what it would have drawn had it never moved.

The built-in processors (penalties, logit bias, temperature, top-k, top-p, min-p) live in
`tandem.plugins.samplers` and register through the plugin manager like third-party ones.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tandem.errors import InvalidRequestError, PluginError
from tandem.outputs import TokenLogprob
from tandem.sampling_params import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A request's private RNG; an unseeded request gets a random seed from the OS."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class RandomStream:
    """One sample's random stream, addressed by output position (counter-based, like Philox or
    JAX's keys): `at(i)` is a generator seeded from (seed, i), used for every draw that chooses
    output token i. No draw depends on how many draws came before, so a stream can be resumed
    anywhere, on any worker, from its seed and position alone."""

    def __init__(self, seed: int | None):
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1

    def at(self, position: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(digest, "little") >> 1)
        return g


@dataclass
class SamplingBatch:
    """What processors may read about the rows of one sampling call (row i = logits row i)."""

    params: Sequence[SamplingParams]
    token_ids: Sequence[Sequence[int]]  # prompt + output so far, per row
    num_prompt_tokens: Sequence[int] = ()  # per row; empty = every token is prompt
    generators: Sequence[torch.Generator] = ()  # per row, for processors that draw randomness

    def prompt_ids(self, row: int) -> Sequence[int]:
        return self.token_ids[row][:self._prompt_len(row)]

    def output_ids(self, row: int) -> Sequence[int]:
        return self.token_ids[row][self._prompt_len(row):]

    def _prompt_len(self, row: int) -> int:
        return self.num_prompt_tokens[row] if self.num_prompt_tokens else len(self.token_ids[row])


class LogitsProcessor:
    """Base class of samplers / logits processors. Subclass it, set `name` and `order`, implement
    `__call__`, and (for per-request arguments) `validate`.

    A request turns a plugin processor on through `SamplingParams.logits_processors`:
    `{"typical_p": {"mass": 0.9}}` -> `validate(mass=0.9)` runs when the request is added (bad
    arguments fail the request before any work) and its result is the row's argument.
    Built-ins override `parse` to read SamplingParams' own fields instead.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 450  # after temperature (400), before top-k (500): see docs/plugins.md
    api_version: ClassVar[int] = 1  # the tandem.plugins.API_VERSION this processor was written for

    def parse(self, params: SamplingParams, vocab_size: int) -> Any | None:
        """This processor's argument for one request, or None when the request does not use it."""
        kwargs = params.logits_processors.get(self.name)
        return None if kwargs is None else self.validate(**kwargs)

    def bind(self, tokenizer) -> None:
        """Called once by the engine that runs this processor, with its model's tandem Tokenizer
        (a processor that constrains text needs the tokens' bytes). Default: nothing."""

    def validate(self, **kwargs) -> Any:
        """Check a request's arguments (raise InvalidRequestError); return the row argument."""
        if kwargs:
            raise InvalidRequestError(f"logits processor {self.name!r} takes no arguments, got {sorted(kwargs)}")
        return {}

    def __call__(self, logits: torch.Tensor, args: list[Any | None], batch: SamplingBatch) -> torch.Tensor:
        """Return new logits (B, V) fp32. Rows whose argument is None must come back unchanged;
        write -inf to exclude a token. Do not modify `logits` in place."""
        raise NotImplementedError


@dataclass
class SampleResult:
    tokens: list[int]
    failures: dict[int, PluginError] = field(default_factory=dict)  # row -> the plugin error that hit it


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprob]:
    """Row i's token tokens[i] with its log-probability under softmax(logits[i]) (raw logits, fp32)
    and the num_top[i] most likely tokens. logits (R, V)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1)).squeeze(1).tolist()
    k = max(num_top, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(int(t), lp, list(zip(top_ids[i][:n], top_values[i][:n])))
            for i, (t, lp, n) in enumerate(zip(tokens, chosen, num_top))]


class SamplerPipeline:
    """The ordered processors of one engine, plus the draw."""

    def __init__(self, processors: Sequence[LogitsProcessor], vocab_size: int,
                 owners: dict[str, str] | None = None):
        self.processors = sorted(processors, key=lambda p: p.order)
        self.vocab_size = vocab_size
        self.owners = owners or {}  # processor name -> plugin name, for error messages
        self._by_name = {p.name: p for p in self.processors}

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.processors]

    def bind(self, tokenizer) -> SamplerPipeline:
        """Give every processor the model's tokenizer (LogitsProcessor.bind)."""
        for proc in self.processors:
            try:
                proc.bind(tokenizer)
            except Exception as exc:
                raise self._plugin_error(proc, exc) from exc
        return self

    def prepare(self, params: SamplingParams) -> tuple:
        """Every processor's argument for one request; raises InvalidRequestError before any work."""
        unknown = sorted(set(params.logits_processors) - set(self._by_name))
        if unknown:
            raise InvalidRequestError(f"unknown logits processor(s) {unknown}; available: {', '.join(self.names)}")
        args = []
        for proc in self.processors:
            try:
                args.append(proc.parse(params, self.vocab_size))
            except InvalidRequestError:
                raise
            except TypeError as exc:  # validate(**kwargs) with an unexpected keyword
                raise InvalidRequestError(f"logits processor {proc.name!r}: {exc}") from None
            except Exception as exc:
                raise self._plugin_error(proc, exc) from exc
        return tuple(args)

    def process(self, logits: torch.Tensor, batch: SamplingBatch,
                args: Sequence[tuple] | None = None) -> tuple[torch.Tensor, dict[int, PluginError]]:
        """Run every processor some row uses, in order. A processor that raises fails only the
        rows that use it (their logits stay as they were before it)."""
        if args is None:
            args = [self.prepare(p) for p in batch.params]
        failures: dict[int, PluginError] = {}
        for index, proc in enumerate(self.processors):
            column = [row_args[index] for row_args in args]
            if all(a is None for a in column):
                continue
            try:
                out = proc(logits, column, batch)
                if out.shape != logits.shape:
                    raise ValueError(f"returned shape {tuple(out.shape)}, expected {tuple(logits.shape)}")
                logits = out.float()
            except Exception as exc:
                error = self._plugin_error(proc, exc)
                failures.update({row: error for row, a in enumerate(column) if a is not None})
        return logits, failures

    def sample(self, logits: torch.Tensor, batch: SamplingBatch, args: Sequence[tuple] | None = None) -> SampleResult:
        """One next token per row: argmax for greedy rows, a draw from the processed distribution
        otherwise (with the row's generator). A row that cannot be sampled fails alone."""
        processed, failures = self.process(logits.float(), batch, args)
        failures.update(self.invalid_rows(processed, failures))
        chosen = processed.argmax(dim=-1).tolist()
        for row, p in enumerate(batch.params):
            if not p.greedy and row not in failures:
                try:
                    probs = processed[row].softmax(dim=-1)
                    chosen[row] = int(torch.multinomial(probs, 1, generator=batch.generators[row]))
                except RuntimeError as exc:  # the draw itself: this row's problem, not the batch's
                    failures[row] = PluginError(f"sampling failed for this request: {exc}")
        return SampleResult(chosen, failures)

    @staticmethod
    def invalid_rows(processed: torch.Tensor, skip: dict[int, PluginError]) -> dict[int, PluginError]:
        """Rows whose processed logits hold a NaN or no finite value: no distribution to draw from
        (an extreme penalty or bias, a processor's bug). One reduction for the whole batch: the
        row maximum is NaN when any logit is, -inf when all are; only a row whose maximum is +inf
        needs a second look (0.03 ms instead of 0.5 ms a step over a 49,152-token vocabulary)."""
        top = processed.amax(dim=-1)  # (B,); amax propagates NaN
        bad = top.isnan() | (top == float("-inf"))
        positive_inf = top == float("inf")
        if bool(positive_inf.any()):
            bad |= positive_inf & ~processed.isfinite().any(dim=-1)
        if not bool(bad.any()):
            return {}
        return {row: PluginError("sampling failed for this request: its processed logits hold NaN or no finite "
                                 "value (check penalties, logit_bias and logits processors)")
                for row in bad.nonzero().flatten().tolist() if row not in skip}

    def _plugin_error(self, proc: LogitsProcessor, exc: Exception) -> PluginError:
        owner = self.owners.get(proc.name, "unknown plugin")
        return PluginError(f"logits processor {proc.name!r} from plugin {owner!r} failed: "
                           f"{type(exc).__name__}: {exc}")

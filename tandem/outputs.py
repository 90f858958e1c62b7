"""What generation returns, and the engine's output processing: the one place that decides when a
sequence stops.

`OutputBuilder` takes sampled token ids one at a time, keeps the detokenized text (never half a
UTF-8 character), and applies the stop rules of SamplingParams; the in-process API and the engine's
workers both use it, so a request stops the same way wherever it runs. `OutputProcessor` is what
the engine hands every sampled token to: it starts a request's n outputs (forking its sequences at
the first token), picks the logprobs each asked for, turns tokens into StreamDeltas and a finished
request into its RequestOutput.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    import torch

    from tandem.engine.sequence import Request, Sequence


@dataclass
class TokenLogprob:
    """A sampled token's log-probability and the `top` most likely tokens [(id, logprob), ...],
    from the model's raw distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One generated sample. finish_reason: "stop" (EOS, stop token or stop string), "length",
    "abort", "error" (a plugin failed: see RequestOutput.error), or None while it is still running.
    logprobs: one per token id when SamplingParams.logprobs is set, else None."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestMetrics:
    """Timings of one request (seconds, time.monotonic clock) and where its prompt came from."""

    arrival_time: float
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # of sample 0, one per token
    spec_proposed: int = 0  # speculative decoding: guesses verified, accepted, verification rounds
    spec_accepted: int = 0
    spec_rounds: int = 0
    kv_transfer_s: float = 0.0  # moving its prompt's KV blocks from and to the KV-cache store

    @property
    def mean_itl(self) -> float:
        """Mean inter-token latency of sample 0 (0.0 before its second token)."""
        gaps = self.inter_token_latencies
        return sum(gaps) / len(gaps) if gaps else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Accepted guesses per verification round."""
        return self.spec_accepted / self.spec_rounds if self.spec_rounds else 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """One prompt's result: `outputs` holds its n samples; .text, .token_ids and .finish_reason
    are those of the first. error: why the request failed (a plugin raised), else None.
"""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class StreamDelta:
    """What one engine step added to one sample: new token ids and the text safe to show."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked

    def to_pb(self, tokenizer: Tokenizer):
        """As a tandem.v1.SampleDelta (each logprob's token as its bytes)."""
        from tandem.v1 import common_pb2

        def token(token_id: int) -> bytes:
            return tokenizer.decode_bytes([token_id], skip_special_tokens=False)

        logprobs = [common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=token(lp.token_id),
                                            top=[common_pb2.TokenLogprob(token_id=t, logprob=v, token=token(t))
                                                 for t, v in lp.top])
                    for lp in self.logprobs or ()]
        return common_pb2.SampleDelta(index=self.index, token_ids=self.token_ids, text=self.text,
                                      finish_reason=self.finish_reason or "", logprobs=logprobs)


@dataclass
class ScoreOutput:
    """Teacher-forced scores of a token sequence: for each token after the first, its log-probability
    given the tokens before it, and the model's most likely token at that position."""

    logprobs: list[float]
    argmax_ids: list[int]

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


class OutputBuilder:
    """Accumulates one sequence's generated tokens and text; says when and why it finished."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_len: int, max_model_len: int):
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.text = ""
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eog_ids))
        self._max_len = min(params.max_tokens, max_model_len - prompt_len)
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._streamed = 0  # characters of text already handed out by append()

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> str:
        """Record a sampled token; return the text now safe to stream. While a stop string could
        still be forming, its possible beginning is held back; once finished, nothing is added."""
        if self.finished:
            return ""
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
            self.text += self._detok.flush()
        else:
            before = len(self.text)
            self.text += self._detok.add(token_id)
            if self.params.stop and self._truncate_at_stop(before):
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self._max_len:
                self.finish_reason = "length"
                self.text += self._detok.flush()
        return self._streamable_delta()

    def _streamable_delta(self) -> str:
        end = len(self.text)
        if not self.finished and self._longest_stop:
            end = max(self._streamed, end - (self._longest_stop - 1))
        delta, self._streamed = self.text[self._streamed:end], end
        return delta

    def _truncate_at_stop(self, before: int) -> bool:
        start = max(0, before - self._longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    """The engine's output side, one instance per engine (no tensors but the logits it reads)."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len

    def start(self, request: Request) -> None:
        """Begin the request's n outputs (a builder and a random stream per sample)."""
        from tandem.sampling import RandomStream

        p = request.params
        if request.seqs:
            request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        for index in range(p.n):
            request.builders.append(OutputBuilder(self.tokenizer, p, len(request.prompt_ids), self.max_model_len))
            request.randomness.append(RandomStream(None if p.seed is None else p.seed + index))

    def expand_forks(self, seqs: list[Sequence], requests: dict[str, Request],
                     fork: Callable[[Sequence, int], Sequence]) -> tuple[list[Sequence], list[int]]:
        """Rows to sample: a request's first sampling step starts its outputs and forks its n - 1
        siblings (fork(seq, index) shares the prompt's blocks), which sample from the same logits
        row. Returns the sequences and, for each, its row in `seqs`."""
        out, rows = [], []
        for row, seq in enumerate(seqs):
            request = requests[seq.request_id]
            family = [seq]
            if not request.builders:
                self.start(request)
                for index in range(1, request.params.n):
                    child = fork(seq, index)
                    request.seqs.append(child)
                    family.append(child)
            out += family
            rows += [row] * len(family)
        return out, rows

    @staticmethod
    def logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int],
                 params: list[SamplingParams]) -> list[list[TokenLogprob] | None]:
        """Per row, [the logprob of its token] for the rows whose request asked; None for the others."""
        from tandem.sampling import token_logprobs

        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[list[TokenLogprob] | None] = [None] * len(rows)
        if wanted:
            found = token_logprobs(logits[[rows[i] for i in wanted]], [tokens[i] for i in wanted],
                                   [params[i].logprobs for i in wanted])
            for i, lp in zip(wanted, found):
                out[i] = [lp]
        return out

    @staticmethod
    def append(request: Request, index: int, tokens: list[int], now: float,
               logprobs: list[TokenLogprob] | None = None) -> StreamDelta:
        """Give sample `index` its new tokens until it finishes (the delta says which it took)."""
        builder = request.builders[index]
        text, added = "", []
        for j, token in enumerate(tokens):
            text += builder.append(token, logprobs[j] if logprobs else None)
            added.append(token)
            if index == 0:
                request.metrics.first_token_time = request.metrics.first_token_time or now
                request.metrics.token_times.append(now)
            if builder.finished:
                break
        return StreamDelta(request.request_id, index, added, text, builder.finish_reason,
                           logprobs[:len(added)] if logprobs else None)

    @staticmethod
    def output(request: Request) -> RequestOutput:
        """The request's RequestOutput as it stands (final once it finished or failed)."""
        if request.resumed and request.seqs:
            request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        if request.spec is not None:
            m, sp = request.metrics, request.spec
            m.spec_proposed, m.spec_accepted, m.spec_rounds = sp.proposed, sp.accepted, sp.rounds
        outputs = [CompletionOutput(i, list(b.token_ids), b.text, b.finish_reason,
                                    None if b.logprobs is None else list(b.logprobs))
                   for i, b in enumerate(request.builders)]
        finished = (request.finished and not request.saving) or bool(request.error)
        return RequestOutput(request.request_id, request.prompt_ids, outputs, finished, request.metrics,
                             request.error)

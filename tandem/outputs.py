"""What generation returns, and the one place that decides when a sequence stops.

`OutputBuilder` takes sampled token ids one at a time, keeps the detokenized text (never half a
UTF-8 character), and applies the stop rules of SamplingParams; the in-process API and the engine's
workers both use it, so a request stops the same way wherever it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer, Tokenizer


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
class KVHandoff:
    """What a prefill-only request leaves for the decode side: the content hashes of the prompt's
    full KV blocks, and the KV (ModelRunner.export_blocks' format) of the ones computed here."""

    block_hashes: list[bytes]
    new_hashes: list[bytes]
    new_blocks: list[list]  # one list of tensors per entry of new_hashes


@dataclass
class RequestOutput:
    """One prompt's result: `outputs` holds its n samples; .text, .token_ids and .finish_reason
    are those of the first. error: why the request failed (a plugin raised), else None.
    kv: the KV handoff of a prefill-only request (disaggregated serving), else None."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    kv: KVHandoff | None = None

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

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
class RequestOutput:
    """One prompt's result. finish_reason: "stop" (EOS, stop token or stop string) or "length"."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)


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
        self.text = ""
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eog_ids))
        self._max_len = min(params.max_tokens, max_model_len - prompt_len)
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._streamed = 0  # characters of text already handed out by append()

    def append(self, token_id: int) -> str:
        """Record a sampled token; return the text now safe to stream. While a stop string could
        still be forming, its possible beginning is held back; once finished, nothing is added."""
        if self.finished:
            return ""
        self.token_ids.append(token_id)
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

"""Translation between tandem.v1 messages and the core's types: the only place that knows both.

A bad value becomes the core's InvalidRequestError with the core's message, so the gateway answers
INVALID_ARGUMENT with the same words the library raises.
"""
from __future__ import annotations

import json

from tandem.errors import InvalidRequestError
from tandem.limits import MAX_SPECULATIVE_JSON_BYTES, MAX_PROCESSOR_ARG_BYTES, check_text, check_token_ids
from tandem.outputs import RequestMetrics, StreamDelta, TokenLogprob
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import Tokenizer
from tandem.v1 import common_pb2

_OPTIONAL = ("max_tokens", "n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "skip_special_tokens", "logprobs")


def sampling_params(msg: common_pb2.SamplingParams) -> SamplingParams:
    kwargs = {key: getattr(msg, key) for key in _OPTIONAL if msg.HasField(key)}
    check_text("logits_processors_json", msg.logits_processors_json, 2 * MAX_PROCESSOR_ARG_BYTES)
    check_text("speculative_json", msg.speculative_json, MAX_SPECULATIVE_JSON_BYTES)
    if msg.logits_processors_json:
        try:
            kwargs["logits_processors"] = json.loads(msg.logits_processors_json)
        except ValueError as exc:
            raise InvalidRequestError(f"logits_processors_json is not valid JSON: {exc}") from None
    if msg.speculative_json:
        try:
            kwargs["speculative"] = json.loads(msg.speculative_json)
        except ValueError as exc:
            raise InvalidRequestError(f"speculative_json is not valid JSON: {exc}") from None
    return SamplingParams(logit_bias=dict(msg.logit_bias), stop=list(msg.stop) or None,
                          stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                          cache_salt=msg.cache_salt or None, **kwargs)


def sampling_message(params: SamplingParams) -> common_pb2.SamplingParams:
    """The message for validated params (what the gateway forwards to the workers)."""
    return common_pb2.SamplingParams(
        max_tokens=params.max_tokens, n=params.n, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logit_bias=params.logit_bias, seed=params.seed, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens,
        logits_processors_json=json.dumps(params.logits_processors) if params.logits_processors else "",
        speculative_json="" if params.speculative == "default" else json.dumps(params.speculative),
        logprobs=params.logprobs, cache_salt=params.cache_salt or "")


def delta_message(delta: StreamDelta, tokenizer: Tokenizer) -> common_pb2.SampleDelta:
    return common_pb2.SampleDelta(index=delta.index, token_ids=delta.token_ids, text=delta.text,
                                  finish_reason=delta.finish_reason or "",
                                  logprobs=[logprob_message(lp, tokenizer) for lp in delta.logprobs or ()])


def logprob_message(lp: TokenLogprob, tokenizer: Tokenizer) -> common_pb2.TokenLogprob:
    def token(token_id: int) -> bytes:
        return tokenizer.decode_bytes([token_id], skip_special_tokens=False)

    return common_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, token=token(lp.token_id),
        top=[common_pb2.TokenLogprob(token_id=t, logprob=v, token=token(t)) for t, v in lp.top])


def token_ids(values) -> list[int]:
    """Repeated int64 as a list of Python ints (the engine checks their range)."""
    return [int(v) for v in values]


def prompt_ids(values, name: str = "prompt") -> list[int]:
    """A caller's token-id prompt: bounded in length and id range before it goes anywhere (the
    engine then checks the ids against the model's vocabulary)."""
    return check_token_ids(name, values)


def mean_itl(metrics: RequestMetrics | None) -> float:
    gaps = metrics.inter_token_latencies if metrics else []
    return sum(gaps) / len(gaps) if gaps else 0.0

"""Translation between tandem.v1 messages and the core's types, for what the services send and
receive besides sampling parameters (tandem.SamplingParams converts itself: to_pb / from_pb).
"""
from __future__ import annotations

from tandem.limits import check_token_ids
from tandem.outputs import RequestMetrics, StreamDelta, TokenLogprob
from tandem.tokenizer import Tokenizer
from tandem.v1 import common_pb2


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

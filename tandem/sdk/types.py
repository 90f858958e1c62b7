"""What the SDK returns: a streamed Chunk per GenerateResponse, and the Completion they add up to.

Plain dataclasses made from the Gateway's messages (gateway.proto, common.proto) at the edge, so
callers never touch protobuf.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tandem.v1 import common_pb2, gateway_pb2


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. completion_tokens is over all n samples; cached_tokens are prompt
    tokens whose KV came from a cache (a worker's prefix cache or the KV store). disaggregated and
    route_reason: where the server ran the prompt and why (its `disaggregate` policy: "short_prompt",
    "long_prompt", "prefill_busy", "always", "never", ...; docs/serving.md)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    spec_proposed_tokens: int = 0  # speculative decoding: guesses verified, and accepted
    spec_accepted_tokens: int = 0
    disaggregated: bool = False
    route_reason: str = ""

    @classmethod
    def from_pb(cls, pb: common_pb2.Usage) -> Usage:
        return cls(pb.prompt_tokens, pb.completion_tokens, pb.cached_tokens, pb.spec_proposed_tokens,
                   pb.spec_accepted_tokens, pb.disaggregated, pb.route_reason)


@dataclass(frozen=True)
class Timings:
    """Seconds, measured by the server: time to first token, to last token, mean gap between tokens
    of sample 0, time in the prefill worker and moving KV blocks (both 0 when not disaggregated)."""

    ttft: float = 0.0
    e2e: float = 0.0
    mean_itl: float = 0.0
    prefill: float = 0.0
    kv_transfer: float = 0.0

    @classmethod
    def from_pb(cls, pb: common_pb2.Timings) -> Timings:
        return cls(pb.ttft, pb.e2e, pb.mean_itl, pb.prefill, pb.kv_transfer)


@dataclass(frozen=True)
class Source:
    """A retrieved chunk a RAG answer was given: `[n]` in the answer cites the n-th source."""

    id: str
    document_id: str
    title: str
    text: str
    score: float
    position: int


@dataclass(frozen=True)
class Logprob:
    """A sampled token's log-probability (logprobs=k): `token` is its bytes (a byte-level BPE token
    may be part of a UTF-8 character), `top` the k most likely tokens there, most likely first."""

    token_id: int
    logprob: float
    token: bytes
    top: list[Logprob] = field(default_factory=list)

    @classmethod
    def from_pb(cls, pb: common_pb2.TokenLogprob) -> Logprob:
        return cls(pb.token_id, pb.logprob, pb.token, [cls.from_pb(t) for t in pb.top])


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a request: new token ids and text of sample `index`. finish_reason
    ("stop", "length", "abort" or "error") is set on a sample's last chunk, None before. The
    request's last chunk has finished=True and carries usage and timings (None on the others)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    finished: bool = False
    usage: Usage | None = None
    timings: Timings | None = None
    sources: list[Source] = field(default_factory=list)  # with rag, on the last chunk
    logprobs: list[Logprob] = field(default_factory=list)  # one per token id, with logprobs=k

    @classmethod
    def from_pb(cls, pb: gateway_pb2.GenerateResponse) -> Chunk:
        delta = pb.delta
        return cls(
            request_id=pb.request_id,
            index=delta.index,
            token_ids=list(delta.token_ids),
            text=delta.text,
            finish_reason=delta.finish_reason or None,
            finished=pb.finished,
            usage=Usage.from_pb(pb.usage) if pb.finished else None,
            timings=Timings.from_pb(pb.timings) if pb.finished else None,
            sources=[Source(c.id, c.document_id, c.title, c.text, c.score, c.position) for c in pb.sources],
            logprobs=[Logprob.from_pb(lp) for lp in delta.logprobs],
        )


@dataclass
class Completion:
    """A whole request's output: per sample index, its text, token ids and finish reason; like
    tandem.RequestOutput, .text, .token_ids and .finish_reason are sample 0's.

        result = client.complete("The capital of France is", max_tokens=8, n=2)
        result.text            # sample 0
        result.texts[1]        # sample 1 (result.sample_token_ids[1] its tokens)
        result.usage.completion_tokens, result.timings.ttft
    """

    request_id: str = ""
    texts: list[str] = field(default_factory=list)
    sample_token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    usage: Usage | None = None
    timings: Timings | None = None
    sources: list[Source] = field(default_factory=list)
    sample_logprobs: list[list[Logprob]] = field(default_factory=list)  # per sample, with logprobs=k

    @property
    def text(self) -> str:
        """Sample 0's text ("" when the stream had none)."""
        return self.texts[0] if self.texts else ""

    @property
    def token_ids(self) -> list[int]:
        return self.sample_token_ids[0] if self.sample_token_ids else []

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None

    @property
    def logprobs(self) -> list[Logprob]:
        """Sample 0's token logprobs (empty unless the request set logprobs)."""
        return self.sample_logprobs[0] if self.sample_logprobs else []

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> Completion:
        result = cls()
        for chunk in chunks:
            result._add(chunk)
        return result

    def _add(self, chunk: Chunk) -> None:
        self.request_id = self.request_id or chunk.request_id
        while len(self.texts) <= chunk.index:
            self.texts.append("")
            self.sample_token_ids.append([])
            self.finish_reasons.append(None)
            self.sample_logprobs.append([])
        self.texts[chunk.index] += chunk.text
        self.sample_token_ids[chunk.index].extend(chunk.token_ids)
        self.sample_logprobs[chunk.index].extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reasons[chunk.index] = chunk.finish_reason
        if chunk.finished:
            self.usage, self.timings, self.sources = chunk.usage, chunk.timings, list(chunk.sources)

"""The OpenAI API's wire format: request models (validated by pydantic), their translation to
SamplingParams, and the response, chunk, logprobs and error objects.

Follows OpenAI's API reference for /v1/completions and /v1/chat/completions, plus the extra
sampling fields vLLM accepts (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens) and tandem's own (speculative, rag), sent by the openai client through
`extra_body`. A field OpenAI defines that tandem cannot honour (echo, suffix, best_of > n,
tools, a non-text response_format) is refused with a 400 naming it, never silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.errors import InvalidRequestError
from tandem.sampling_params import SamplingParams
from tandem.v1 import common_pb2, gateway_pb2

# HTTP status and OpenAI error type for each gRPC status the gateway can produce.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
               "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    """An error answered in the API's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class RagRequest(BaseModel):
    """tandem's extension: answer from retrieved chunks (extra_body={"rag": {"k": 4}})."""

    model_config = ConfigDict(extra="forbid")
    k: int = 0
    collection: str = ""
    hybrid: bool | None = None

    def to_pb(self) -> gateway_pb2.RagOptions:
        options = gateway_pb2.RagOptions(k=self.k, collection=self.collection)
        if self.hybrid is not None:
            options.hybrid = self.hybrid
        return options


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # tandem's extras
    speculative: dict | str | None = "default"
    rag: RagRequest | None = None

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams for these fields; bad values raise InvalidRequestError (-> 400)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}") from None
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                               "top_k", "min_p", "repetition_penalty", "skip_special_tokens")
                 if getattr(self, k) is not None}
        return SamplingParams(max_tokens=max_tokens, n=self.n, stop=self.stop, seed=self.seed, logit_bias=bias,
                              ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids or [],
                              speculative=self.speculative, logprobs=logprobs, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check_supported(self) -> None:
        if self.echo:
            raise InvalidRequestError("echo is not supported")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (it may only equal n)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"message content parts of type {part.get('type')!r} are not "
                                          "supported; this model takes text")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        if self.tools:
            raise InvalidRequestError("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequestError(f"response_format {self.response_format.get('type')!r} is not supported")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs to be true")
            if not 0 <= self.top_logprobs <= 20:
                raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice is not supported")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def pb_messages(self) -> list[common_pb2.ChatMessage]:
        for m in self.messages:
            if m.role == "tool":
                raise InvalidRequestError("tool messages are not supported")
        return [common_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                for m in self.messages]


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def token_text(raw: bytes) -> str:
    """A token as text; a token that is part of a UTF-8 character shows as its bytes (vLLM's way)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class CompletionLogprobs:
    """The legacy completions logprobs object, built token by token."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self._offset = 0

    def add(self, items) -> dict:
        """Append some tokens' logprobs; returns the object of just those (a stream chunk's)."""
        start = len(self.tokens)
        for lp in items:
            text = token_text(lp.token)
            self.tokens.append(text)
            self.token_logprobs.append(lp.logprob)
            self.top_logprobs.append({token_text(t.token): t.logprob for t in lp.top})
            self.text_offset.append(self._offset)
            self._offset += len(text)
        return {key: values[start:] for key, values in self.to_dict().items()}

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def chat_logprobs(items) -> list[dict]:
    """The chat logprobs entries ({"token", "logprob", "bytes", "top_logprobs"}) of some tokens."""
    def entry(lp, top: bool) -> dict:
        out = {"token": token_text(lp.token), "logprob": lp.logprob, "bytes": list(lp.token)}
        if top:
            out["top_logprobs"] = [entry(t, False) for t in lp.top]
        return out

    return [entry(lp, True) for lp in items]

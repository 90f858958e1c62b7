"""The OpenAI API's wire format: request models (validated by pydantic), their translation to
SamplingParams, and the response, chunk, logprobs and error objects.

Follows OpenAI's API reference for /v1/completions and /v1/chat/completions, plus the extra
sampling fields vLLM accepts (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens) and tandem's own (speculative, rag, disaggregate), sent by the openai client
through `extra_body`. A field OpenAI defines that tandem cannot honour (echo, suffix, best_of > n,
tools) is refused with a 400 naming it, never silently ignored. response_format (json_object,
json_schema) and vLLM's structured_outputs constrain the answer (plugins/structured.py).
Every field states the bounds the server enforces (tandem.limits), so /openapi.json describes what
is accepted.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.errors import InvalidRequestError
from tandem.limits import (MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_MESSAGE_CHARS,
                           MAX_MESSAGES, MAX_N, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_PROMPTS,
                           MAX_RAG_K, MAX_REPETITION_PENALTY, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                           MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MAX_TOKEN_ID, MAX_TOKENS_LIMIT, MAX_TOP_K,
                           MIN_REPETITION_PENALTY, MIN_TOP_P)
from tandem.sampling_params import SamplingParams
from tandem.speculative import MAX_K
from tandem.v1 import common_pb2, gateway_pb2

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
PromptIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]

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
    k: int = Field(0, ge=0, le=MAX_RAG_K)
    collection: Name = ""
    hybrid: bool | None = None

    def to_pb(self) -> gateway_pb2.RagOptions:
        options = gateway_pb2.RagOptions(k=self.k, collection=self.collection)
        if self.hybrid is not None:
            options.hybrid = self.hybrid
        return options


class StreamOptions(BaseModel):
    include_usage: bool = False


class SpeculativeRequest(BaseModel):
    """tandem's extension: this request's speculative decoding, among the methods the server
    enables. The proposer's options are the server's: a request carrying them gets a 400."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field("none", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    k: int = Field(5, ge=1, le=MAX_K)
    adaptive: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_options(cls, data):
        if isinstance(data, dict) and "options" in data:
            raise ValueError("speculative options come from the server's configuration; a request may choose "
                             "only method, k and adaptive")
        return data


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: one constraint on the answer (plugins/structured.py)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS)]],
                      Field(min_length=1, max_length=MAX_STOP_STRINGS * 64)] | None = None
    grammar: Annotated[str, Field(min_length=1, max_length=MAX_MESSAGE_CHARS)] | None = None

    def constraint(self) -> dict:
        given = {k: v for k, v in (("json_schema", self.json_), ("json_object", self.json_object),
                                   ("regex", self.regex), ("choice", self.choice), ("grammar", self.grammar))
                 if v not in (None, False)}
        if len(given) != 1:
            raise InvalidRequestError(f"structured_outputs takes exactly one of json, json_object, regex, choice, "
                                      f"grammar; got {sorted(given) or 'none'}")
        return given


def response_format_constraint(response_format: dict | None) -> dict | None:
    """OpenAI's response_format as a structured_output constraint: text (none), json_object, or
    json_schema {name, schema, strict}."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema needs json_schema.schema, a JSON Schema object")
        return {"json_schema": schema}
    raise InvalidRequestError(f"response_format {kind!r} is not supported (text, json_object, json_schema)")


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does
    model: Name | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                               Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES,
                                json_schema_extra={"additionalProperties": False})] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = None
    # OpenAI's response_format (chat; accepted on completions too, as vLLM does) and vLLM's structured_outputs
    response_format: dict | None = None
    structured_outputs: StructuredOutputs | None = None
    # tandem's extras
    speculative: SpeculativeRequest | Literal["default"] | None = "default"
    rag: RagRequest | None = None
    # where the prompt runs (services.routing); None: the server's `disaggregate` setting
    disaggregate: Literal["auto", "always", "never"] | None = None

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
        speculative = self.speculative.model_dump() if isinstance(self.speculative, BaseModel) else self.speculative
        constraint = response_format_constraint(self.response_format)
        if self.structured_outputs is not None:
            if constraint is not None:
                raise InvalidRequestError("give response_format or structured_outputs, not both")
            constraint = self.structured_outputs.constraint()
        processors = {"structured_output": constraint} if constraint is not None else {}
        return SamplingParams(max_tokens=max_tokens, n=self.n, stop=self.stop, seed=self.seed, logit_bias=bias,
                              ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids or [],
                              speculative=speculative, logprobs=logprobs, cache_salt=self.cache_salt,
                              logits_processors=processors, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter: a PEFT adapter directory on the workers' machines, inside
    the pipeline's runtime_lora_dir (a relative path is taken from there)."""

    model_config = ConfigDict(extra="ignore")  # vLLM's load_inplace and the like
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class CompletionRequest(_Sampling):
    prompt: (PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] | PromptIds
             | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False  # not supported
    suffix: str | None = Field(None, max_length=0)  # not supported: only empty
    best_of: int | None = Field(None, ge=1, le=MAX_N)

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
        if self.suffix:
            raise InvalidRequestError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (it may only equal n)")


class TextPart(BaseModel):
    """A part of a message's content; this model takes text parts only."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]  # tool messages are not supported
    content: (Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
              | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None) = None
    name: Name | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: Any = None

    def check_supported(self) -> None:
        if self.tools:
            raise InvalidRequestError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice is not supported")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def pb_messages(self) -> list[common_pb2.ChatMessage]:
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, routes: list[dict] | None = None) -> dict:
    """OpenAI's usage object; tandem adds `routes`: per prompt, in order, where it ran
    ({"disaggregated": bool, "reason": str}, services.routing)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if routes:
        out["routes"] = routes
    return out


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

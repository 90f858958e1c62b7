"""Bounds on what one request may carry: the one place they are declared.

SamplingParams checks its fields against them (library, gRPC and HTTP alike); the gateway checks
prompts, messages and options with `check_text` and the list bounds before any work; the OpenAI
request models state them in /openapi.json (pydantic `Field(le=..., max_length=...)`), so what the
schema allows is what the server accepts. Each bound is far above what a real caller sends and
small enough that one request cannot make a service do unbounded work.
"""
from __future__ import annotations

from tandem.errors import InvalidRequestError

MAX_TOKENS_LIMIT = 1 << 20  # max_tokens: anything above is a typo, whatever the context window
MAX_N = 64  # samples per prompt
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # each stop string is matched against every step's text
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI allows 300; a little more room for programmatic callers
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_PROCESSOR_ARG_BYTES = 64 << 10  # a plugin's per-request arguments, as JSON (a structured output's schema)
MAX_TOKEN_ID = (1 << 31) - 1  # no vocabulary comes near; the engine checks the model's own size
MAX_TOP_K = MAX_TOKEN_ID  # top_k above the vocabulary size keeps every token
# top_p below this is 0 in fp32 (5e-324 is a valid double) and filters out every token: NaN.
MIN_TOP_P = 1e-30
MAX_TEMPERATURE = 100.0  # fp32 logits / 100 are already uniform; larger values only risk overflow
# repetition_penalty divides or multiplies logits: far outside [1e-3, 1e3] a penalty pushes fp32
# logits toward 0 or inf (1e-300 is 0 in fp32 and gives inf/NaN), and no caller means such a value.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3
MAX_CACHE_SALT_CHARS = 256
MAX_SPECULATIVE_JSON_BYTES = 1024
# Prompts and messages. The context window bounds a prompt in tokens; these bound the work the
# gateway and the tokenizer do before that is known.
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_PROMPT_TOKENS = 1 << 20
MAX_MESSAGES = 256  # chat messages in one request
MAX_MESSAGE_CHARS = 1 << 20
MAX_ROLE_CHARS = 32
MAX_NAME_CHARS = 256  # model, request_id, user, collection
MAX_PATH_CHARS = 4096  # a runtime LoRA adapter's directory (PATH_MAX on Linux)
MAX_RAG_K = 64  # chunks retrieved for one request


def check_text(name: str, text: str, max_chars: int) -> str:
    """text if it is a str of at most max_chars that UTF-8 can encode (no lone surrogate, such as
    JSON's "\\ud800", which no service could send on); else InvalidRequestError naming the field."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InvalidRequestError(f"{name} has {len(text)} characters; the limit is {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{name} is not valid Unicode text: {exc.reason} at position {exc.start}") from None
    return text


def check_count(name: str, values, max_count: int) -> None:
    if len(values) > max_count:
        raise InvalidRequestError(f"{name} has {len(values)} items; the limit is {max_count}")


def check_token_ids(name: str, ids) -> list[int]:
    """ids as a list of ints in [0, MAX_TOKEN_ID], at most MAX_PROMPT_TOKENS of them (the engine
    then checks them against the model's vocabulary)."""
    check_count(name, ids, MAX_PROMPT_TOKENS)
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i <= MAX_TOKEN_ID]
    if bad:
        raise InvalidRequestError(f"{name}: token ids must be in [0, {MAX_TOKEN_ID}], got {bad[:5]}")
    return out

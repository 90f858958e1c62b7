"""SamplingParams: how one request picks its tokens and when it stops. Validated on construction,
so a bad value fails before any work starts, with a message that says what is allowed.

It converts itself to and from its message, tandem.v1.SamplingParams (`to_pb` / `from_pb`, as
TGI's domain types do): the one place that knows both, used by the gateway, the workers and the
SDK (`fields_to_pb`, for the fields a caller gave). The generated protobuf module loads on first use.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from tandem.errors import InvalidRequestError
from tandem.limits import (MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_N,
                           MAX_PROCESSOR_ARG_BYTES, MAX_REPETITION_PENALTY, MAX_SPECULATIVE_JSON_BYTES,
                           MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE,
                           MAX_TOKEN_ID, MAX_TOKENS_LIMIT, MAX_TOP_K, MIN_REPETITION_PENALTY, MIN_TOP_P,
                           check_text)

if TYPE_CHECKING:
    from tandem.v1 import common_pb2

# Temperatures below this are greedy: dividing fp32 logits by less overflows (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def _is_token_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_TOKEN_ID


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_or_none(x) -> str | None:
    try:
        return json.dumps(x)
    except (TypeError, ValueError):
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping rules (vLLM's names and defaults).

    Order of application (each step is a logits-processor plugin; plugin processors slot in by
    their `order`, default between temperature and top-k): logit bias -> repetition penalty ->
    presence/frequency penalties -> temperature -> top-k -> top-p -> min-p -> draw.
    temperature=0 (or below 1e-5) means greedy (argmax); top_k=0, top_p=1, min_p=0 turn those filters off.
    repetition_penalty (CTRL's, over prompt and output; 1 = off); presence_penalty and
    frequency_penalty (OpenAI's, in [-2, 2], over the output only; 0 = off); logit_bias: token id
    -> value in [-100, 100] added to its logit. logits_processors: plugin processor name -> its
    keyword arguments, e.g. {"typical_p": {"mass": 0.9}}.
    n samples are drawn per prompt, sharing the prompt's KV blocks; with a seed, sample i uses
    seed + i. speculative: "default" (the engine's setting), None or {"method": "none"} (off), or
    {"method": "ngram", "k": 5, "adaptive": True} for this request: a method the engine enables
    (its proposer's options come only from the engine's configuration, never from a request); the
    output is the same either way (greedy: the same tokens; sampling: the same distribution).
    The output stops at max_tokens, an end-of-generation token (unless ignore_eos), a token in
    stop_token_ids, or a stop string (which is not included in the text).
    logprobs: None (off) or k in [0, 20]: each sampled token's log-probability plus the k most
    likely alternatives, from the model's raw distribution (before penalties, temperature and
    filters: vLLM's default "raw_logprobs").
    cache_salt (vLLM's name): requests share prefix-cache blocks (and KV-store blocks) only with
    requests of the same salt; the gateway gives each API key its own. None: the unsalted cache.
    Bounds on every field are in tandem.limits.
    """

    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logits_processors: dict[str, dict] = field(default_factory=dict)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    speculative: dict | None | str = "default"
    logprobs: int | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
               and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
               f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens!r}")
        _check(isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= MAX_N,
               f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(_is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
               f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and 0 <= self.top_k <= MAX_TOP_K,
               f"top_k must be an integer in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        _check(_is_number(self.top_p) and MIN_TOP_P <= self.top_p <= 1,
               f"top_p must be in (0, 1] (at least {MIN_TOP_P:g}), got {self.top_p!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.repetition_penalty)
               and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
               f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off; "
               f"values beyond push logits to 0 or inf), got {self.repetition_penalty!r}")
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            _check(_is_number(value) and -2 <= value <= 2, f"{key} must be in [-2, 2] (0 = off), got {value!r}")
        self.logit_bias = {} if self.logit_bias is None else self.logit_bias
        _check(isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES
               and all(_is_token_id(k) and _is_number(v) and -100 <= v <= 100 for k, v in self.logit_bias.items()),
               f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to values in [-100, 100], "
               f"got {_short(self.logit_bias)}")
        self.logits_processors = {} if self.logits_processors is None else self.logits_processors
        _check(isinstance(self.logits_processors, dict)
               and all(isinstance(k, str) and isinstance(v, dict) and all(isinstance(a, str) for a in v)
                       for k, v in self.logits_processors.items()),
               f"logits_processors must map processor names to keyword-argument dicts, "
               f"got {_short(self.logits_processors)}")
        _check(len(_json_or_none(self.logits_processors) or "x" * (MAX_PROCESSOR_ARG_BYTES + 1))
               <= MAX_PROCESSOR_ARG_BYTES,
               f"logits_processors must be JSON-serializable and at most {MAX_PROCESSOR_ARG_BYTES} bytes as JSON")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                     and 0 <= self.seed < 2**63),
               f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [] if self.stop is None else self.stop
        _check(isinstance(self.stop, (list, tuple)) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
               f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
               f"{MAX_STOP_STRING_CHARS} characters, got {_short(self.stop)}")
        self.stop = [check_text("stop", s, MAX_STOP_STRING_CHARS) for s in self.stop]
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        _check(isinstance(self.stop_token_ids, (list, tuple)) and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS
               and all(_is_token_id(t) for t in self.stop_token_ids),
               f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in [0, {MAX_TOKEN_ID}], "
               f"got {_short(self.stop_token_ids)}")
        self.stop_token_ids = list(self.stop_token_ids)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.cache_salt is not None:
            check_text("cache_salt", self.cache_salt, MAX_CACHE_SALT_CHARS)
        if self.speculative != "default":
            from tandem.speculative import SpeculativeConfig

            SpeculativeConfig.parse_request(self.speculative)  # raises InvalidRequestError

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def to_pb(self) -> common_pb2.SamplingParams:
        """These params as a tandem.v1.SamplingParams (what the gateway forwards to the workers).
        Every field is set but seed and logprobs when None, speculative when "default" and
        logits_processors when empty: unset, which from_pb reads back as the same values."""
        return fields_to_pb({name: getattr(self, name) for name in PROTO_FIELDS})

    @classmethod
    def from_pb(cls, msg: common_pb2.SamplingParams) -> SamplingParams:
        """The params of a tandem.v1.SamplingParams, validated: an unset field takes the library's
        default, and a bad value raises InvalidRequestError with the library's message."""
        kwargs = {key: getattr(msg, key) for key in _OPTIONAL_PB_FIELDS if msg.HasField(key)}
        for name, limit in _JSON_PB_LIMITS.items():  # bounded before any is parsed
            check_text(PROTO_FIELDS[name], getattr(msg, PROTO_FIELDS[name]), limit)
        for name in _JSON_PB_LIMITS:
            if text := getattr(msg, PROTO_FIELDS[name]):
                try:
                    kwargs[name] = json.loads(text)
                except ValueError as exc:
                    raise InvalidRequestError(f"{PROTO_FIELDS[name]} is not valid JSON: {exc}") from None
        return cls(logit_bias=dict(msg.logit_bias), stop=list(msg.stop) or None,
                   stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                   cache_salt=msg.cache_salt or None, **kwargs)


# -- the wire: tandem.v1.SamplingParams ----------------------------------------------------------
# The fields that travel as JSON (their values are free-form: plugin kwargs, a speculative method),
# with the bound on their text, checked before it is parsed (the parsed value has its own bounds).
_JSON_PB_LIMITS = {"logits_processors": 2 * MAX_PROCESSOR_ARG_BYTES, "speculative": MAX_SPECULATIVE_JSON_BYTES}
# SamplingParams field -> its proto field: the same name, or NAME_json for the JSON ones.
PROTO_FIELDS: dict[str, str] = {f.name: f"{f.name}_json" if f.name in _JSON_PB_LIMITS else f.name
                                for f in fields(SamplingParams)}
# The proto3 `optional` scalars: unset means the library's default (0 is a value like any other).
_OPTIONAL_PB_FIELDS = ("max_tokens", "n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "seed", "skip_special_tokens", "logprobs")


def fields_to_pb(values: Mapping) -> common_pb2.SamplingParams:
    """The tandem.v1.SamplingParams of some of SamplingParams's fields (name -> value), as given:
    not range-checked (the SDK leaves that to the server, whatever its version). A field left out
    or None stays unset, so the receiver applies the default; speculative None means off, as in
    the library, and "default" stays unset. A value protobuf cannot hold raises
    InvalidRequestError ("NAME must be ..."); an unknown name, TypeError."""
    from tandem.v1 import common_pb2

    unknown = sorted(set(values) - set(PROTO_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling keyword(s) {', '.join(unknown)}; allowed: {', '.join(PROTO_FIELDS)}")
    msg = common_pb2.SamplingParams()
    for name, value in values.items():
        if name == "speculative":
            if value != "default":
                msg.speculative_json = _to_json(name, value)
        elif value is None:
            continue
        elif name == "logits_processors":
            if value != {}:  # the default: nothing to send
                msg.logits_processors_json = _to_json(name, value)
        elif name == "logit_bias":
            _set_logit_bias(msg, value)
        elif name == "cache_salt":
            if not isinstance(value, str):
                raise _cannot_hold(name, "a string", value)
            msg.cache_salt = value
        elif name == "stop":
            _set_repeated(msg, name, [value] if isinstance(value, str) else value, "a string or a list of strings")
        elif name == "stop_token_ids":
            _set_repeated(msg, name, value, "a list of integers")
        else:
            _set_scalar(msg, name, value)
    return msg


def _cannot_hold(name: str, expected: str, value, error: Exception | None = None) -> InvalidRequestError:
    reason = f" ({error})" if error else ""
    return InvalidRequestError(f"{name} must be {expected}, got {value!r}{reason}")


def _set_scalar(msg: common_pb2.SamplingParams, name: str, value) -> None:
    pb_field = msg.DESCRIPTOR.fields_by_name[name]
    expected = {pb_field.CPPTYPE_INT64: "an integer", pb_field.CPPTYPE_DOUBLE: "a number",
                pb_field.CPPTYPE_BOOL: "a bool"}[pb_field.cpp_type]
    # protobuf reads True as 1 in a number; the receiver must see the bool to reject it as the library does
    if isinstance(value, bool) and expected != "a bool":
        raise _cannot_hold(name, expected, value)
    try:
        setattr(msg, name, value)
    except (TypeError, ValueError) as e:
        raise _cannot_hold(name, expected, value, e) from e


def _set_repeated(msg: common_pb2.SamplingParams, name: str, values, expected: str) -> None:
    try:
        getattr(msg, name).extend(values)
    except (TypeError, ValueError) as e:
        raise _cannot_hold(name, expected, values, e) from e


def _set_logit_bias(msg: common_pb2.SamplingParams, bias) -> None:
    expected = "a dict of token id -> number"
    if not isinstance(bias, dict):
        raise _cannot_hold("logit_bias", expected, bias)
    for token_id, value in bias.items():
        if isinstance(value, bool):
            raise _cannot_hold("logit_bias", expected, bias)
        try:
            msg.logit_bias[token_id] = value
        except (TypeError, ValueError) as e:
            raise _cannot_hold("logit_bias", expected, bias, e) from e


def _to_json(name: str, value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise _cannot_hold(name, "JSON-serializable", value, e) from e

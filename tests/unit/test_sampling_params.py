"""Unit tests of tandem.SamplingParams: vLLM's defaults, and validation on construction — every bad
value raises InvalidRequestError (a ValueError) whose message names the offending field.
"""
from __future__ import annotations

import math
import re

import pytest

from tandem.errors import InvalidRequestError
from tandem.sampling_params import MAX_STOP_STRINGS, SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (16, 1.0, 0, 1.0, 0.0, 1.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.greedy is False


BAD_VALUES = [
    ("temperature", -0.1), ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", -math.inf), ("temperature", "0.5"), ("temperature", None), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.5), ("top_p", math.nan), ("top_p", math.inf),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_k", "5"), ("top_k", None),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2**40), ("max_tokens", 1.5), ("max_tokens", 16.0),
    ("max_tokens", True), ("max_tokens", None),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("seed", -1), ("seed", "x"), ("seed", 1.5), ("seed", True), ("seed", 2**63),
    ("stop", [""]), ("stop", [1]), ("stop", ["ok", None]), ("stop", ["s%d" % i for i in range(MAX_STOP_STRINGS + 1)]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", [1.0]),
    # values that can only produce inf/NaN in sampling, and unbounded lists and strings (tandem.limits)
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e-4), ("repetition_penalty", 1e300),
    ("temperature", 1e9), ("top_k", 2**62), ("top_p", 5e-324), ("top_p", 1e-40), ("stop", ["x" * 257]), ("stop", ["a\ud800"]),
    ("stop_token_ids", list(range(257))), ("stop_token_ids", [2**63]), ("logit_bias", {2**62: 1.0}),
    ("logit_bias", {1: math.inf}), ("cache_salt", "s" * 257), ("cache_salt", 5), ("cache_salt", "\udc00"),
    ("speculative", {"method": "ngram", "options": {"max_n": 10**6}}),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v in BAD_VALUES])
def test_bad_value_raises_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=rf"^{field}\b") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)


def test_message_says_what_is_allowed_and_what_was_given():
    with pytest.raises(ValueError, match=re.escape("top_p must be in (0, 1] (at least 1e-30), got 1.5")):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in \[1, 1048576\], got 0"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize("field, value", [
    ("temperature", 0), ("temperature", 0.0), ("temperature", 2), ("top_p", 1), ("top_p", 1e-9),
    ("top_k", 0), ("top_k", 10**9), ("max_tokens", 1), ("max_tokens", 1 << 20), ("min_p", 0), ("min_p", 1),
    ("repetition_penalty", 1e-3), ("repetition_penalty", 5), ("seed", 0), ("seed", 2**63 - 1),
    ("stop_token_ids", [0, 2]),
])
def test_boundary_values_are_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy  # below GREEDY_TEMPERATURE: fp32 would overflow
    assert not SamplingParams(temperature=1e-5).greedy


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)]).stop[-1] == f"s{MAX_STOP_STRINGS - 1}"


def test_stop_list_is_copied():
    stops = ["a"]
    p = SamplingParams(stop=stops)
    stops.append("b")
    assert p.stop == ["a"]


@pytest.mark.parametrize("field", ["stop", "stop_token_ids"])
def test_non_list_stop_fields_raise_invalid_request(field):
    with pytest.raises(InvalidRequestError, match=rf"^{field}\b"):
        SamplingParams(**{field: 5})


def test_bool_stop_token_id_is_rejected():
    with pytest.raises(InvalidRequestError, match=r"^stop_token_ids\b"):
        SamplingParams(stop_token_ids=[True])


# -- the wire: to_pb / from_pb (tandem.v1.SamplingParams) -----------------------------------------
def test_every_field_survives_the_round_trip():
    p = SamplingParams(max_tokens=7, n=2, temperature=0, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                       presence_penalty=-1.0, frequency_penalty=0.5, logit_bias={3: -100.0}, seed=0,
                       logits_processors={"typical_p": {"mass": 0.9}}, stop=["\n"], stop_token_ids=[2],
                       ignore_eos=True, skip_special_tokens=False, speculative={"method": "ngram", "k": 3},
                       logprobs=0, cache_salt="tenant")
    assert SamplingParams.from_pb(p.to_pb()) == p
    for speculative in (None, "default"):
        assert SamplingParams.from_pb(SamplingParams(speculative=speculative).to_pb()).speculative == speculative


def test_unset_fields_take_the_defaults_and_zero_is_a_value():
    from tandem.v1 import common_pb2

    assert SamplingParams.from_pb(common_pb2.SamplingParams()) == SamplingParams()
    msg = SamplingParams().to_pb()
    assert not any(msg.HasField(f) for f in ("seed", "logprobs")) and msg.HasField("temperature")
    assert (msg.logits_processors_json, msg.speculative_json, msg.cache_salt) == ("", "", "")
    zeros = SamplingParams.from_pb(common_pb2.SamplingParams(temperature=0, top_k=0, seed=0, logprobs=0))
    assert (zeros.temperature, zeros.top_k, zeros.seed, zeros.logprobs) == (0, 0, 0, 0) and zeros.greedy


@pytest.mark.parametrize("fields, message", [
    ({"max_tokens": 0}, r"^max_tokens must be an integer in \[1, "),
    ({"logits_processors_json": "{"}, r"^logits_processors_json is not valid JSON: "),
    ({"speculative_json": "[1"}, r"^speculative_json is not valid JSON: "),
    ({"speculative_json": "x" * 100_000}, r"^speculative_json\b"),
])
def test_a_bad_message_raises_the_librarys_error(fields, message):
    from tandem.v1 import common_pb2

    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.from_pb(common_pb2.SamplingParams(**fields))

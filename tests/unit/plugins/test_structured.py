"""Structured outputs (plugins/structured.py, llguidance): on the tiny random model, whose free
output is noise, every answer constrained by a JSON schema (nested objects, arrays, enums, bounded
numbers and strings), a regex or a choice parses and validates, greedy and sampled, alone and in a
batch beside unconstrained rows (which stay exactly what they are alone) and with n samples; a bad
schema or regex fails the request before any work, by name."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

import tandem
from tandem.errors import InvalidRequestError

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["color", "size"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": {"type": "string", "maxLength": 6}},
        "required": ["id", "name"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
]


def constrained(kind: str, value, **sampling) -> tandem.SamplingParams:
    sampling.setdefault("max_tokens", 200)
    return tandem.SamplingParams(logits_processors={"structured_output": {kind: value}}, **sampling)


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    return tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=256)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_schema_answer_parses_and_validates(llm, temperature):
    params = [constrained("json_schema", s, temperature=temperature, seed=i) for i, s in enumerate(SCHEMAS)]
    outs = llm.generate(["Answer in JSON:"] * len(SCHEMAS), params)
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_regex_choice_and_json_object(llm):
    out = llm.generate("Phone:", constrained("regex", r"[0-9]{3}-[0-9]{4}", temperature=1.0, seed=2))[0]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out.text)
    outs = llm.generate(["Yes or no?"] * 4, [constrained("choice", ["yes", "no", "maybe"], temperature=1.0, seed=s)
                                            for s in range(4)])
    assert all(o.text in ("yes", "no", "maybe") for o in outs)
    out = llm.generate("{", constrained("json_object", True, temperature=0, max_tokens=400))[0]
    assert out.text.startswith("{")  # a random model may write one string forever: no bound to end it
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_unconstrained_rows_beside_constrained_ones_are_untouched(llm):
    free = tandem.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate("Once upon a time", free)[0].token_ids
    outs = llm.generate(["Once upon a time", "Answer in JSON:"], [free, constrained("json_schema", SCHEMAS[2])])
    assert outs[0].token_ids == alone
    jsonschema.validate(json.loads(outs[1].text), SCHEMAS[2])


def test_n_samples_each_follow_the_grammar(llm):
    out = llm.generate("Answer in JSON:", constrained("json_schema", SCHEMAS[3], temperature=1.0, seed=5, n=3))[0]
    assert len(out.outputs) == 3
    for sample in out.outputs:
        jsonschema.validate(json.loads(sample.text), SCHEMAS[3])


@pytest.mark.parametrize("kwargs, message", [
    ({"regex": "("}, "cannot compile the regex"),
    ({"json_schema": {"type": 3}}, "cannot compile the json_schema"),
    ({"json_schema": "not a schema"}, "must be a JSON Schema object"),
    ({"choice": []}, "non-empty list"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"json_object": False}, "must be true"),
])
def test_bad_grammars_fail_the_request_before_any_work(llm, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate("x", tandem.SamplingParams(logits_processors={"structured_output": kwargs}))
    assert not llm.engine.has_unfinished()


def test_unbounded_numbers_are_written_with_bounded_digits(llm):
    """A plain number or integer cannot run on: at most 6 decimals and JavaScript's safe integers,
    a subset of what the schema allows (the default model wrote 250-digit fractions without it)."""
    from tandem.plugins.structured import SAFE_INTEGER, bounded

    schema = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"},
                                               "p": {"type": "number", "multipleOf": 0.5, "maximum": 3}},
              "required": ["x", "n", "p"], "additionalProperties": False}
    rewritten = bounded(schema)["properties"]
    assert rewritten["x"] == {"type": "number", "multipleOf": 1e-6, "minimum": -SAFE_INTEGER, "maximum": SAFE_INTEGER}
    assert rewritten["n"] == {"type": "integer", "minimum": -SAFE_INTEGER, "maximum": SAFE_INTEGER}
    assert rewritten["p"] == {"type": "number", "multipleOf": 0.5, "minimum": -SAFE_INTEGER, "maximum": 3}
    assert bounded({"enum": [{"type": "number"}]}) == {"enum": [{"type": "number"}]}  # values stay values
    outs = llm.generate(["Numbers:"] * 6, [constrained("json_schema", schema, temperature=1.0, seed=s, max_tokens=120)
                                           for s in range(6)])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        fraction = re.search(r'"x":-?[0-9]+(?:\.([0-9]+))?', out.text).group(1) or ""
        assert len(fraction) <= 6 and abs(value["x"]) <= SAFE_INTEGER and abs(value["n"]) <= SAFE_INTEGER


def test_speculative_decoding_keeps_the_constrained_greedy_answer(tiny_hf_dir):
    """Verification rows past a guess the grammar refuses are never used: the answer is the one
    decoded without speculation, token for token."""
    with tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=256,
                    speculative={"method": "ngram", "k": 4}) as spec:
        plain = spec.generate("Answer in JSON:", constrained("json_schema", SCHEMAS[4], temperature=0,
                                                              speculative={"method": "none"}))[0]
        guessed = spec.generate("Answer in JSON:", constrained("json_schema", SCHEMAS[4], temperature=0))[0]
        assert spec.engine.stats()["spec_proposed_tokens"] > 0
    assert guessed.token_ids == plain.token_ids and guessed.error is None
    jsonschema.validate(json.loads(guessed.text), SCHEMAS[4])

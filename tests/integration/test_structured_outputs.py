"""Structured outputs through the OpenAI API, as applications use them: the default model behind
the service pipeline (in-process services, HTTP gateway), the openai client asking with
response_format json_schema for each of 20 schemas (tests/data/json_schemas.json: nested objects,
arrays, enums, numbers with bounds, optional fields, anyOf, nullable), greedy and at temperature 1.
Every answer parses and validates. Also json_object, and vLLM's structured_outputs regex and
choice; a schema that does not compile is a 400. The same through tandem's SDK (gRPC), whose
structured_output= keyword is the processor's own argument."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

SCHEMAS = json.loads((Path(__file__).parents[1] / "data" / "json_schemas.json").read_text())


@pytest.fixture(scope="module")
def pipeline():
    from tandem.orchestration.local import InProcessPipeline
    from tandem.services.config import PipelineConfig

    config = PipelineConfig(grpc_port=0, http_port=0, mode="aggregated", replicas={"decode": 1},
                            kv_cache_memory=256 << 20)
    with InProcessPipeline(config) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def client(pipeline):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{pipeline.http_address}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, name: str, schema: dict, temperature: float):
    reply = client.chat.completions.create(
        model="smollm2-135m", temperature=temperature, seed=7, max_tokens=300,
        messages=[{"role": "user", "content": f"Give me a {name.replace('_', ' ')} as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
    return reply.choices[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_answer_to_20_schemas_parses_and_validates(client, temperature):
    with ThreadPoolExecutor(8) as pool:  # batched together on the worker
        choices = list(pool.map(lambda item: _ask(client, *item, temperature), SCHEMAS.items()))
    for (name, schema), choice in zip(SCHEMAS.items(), choices):
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_regex_choice_and_a_bad_schema(client):
    import openai

    reply = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=300,
                                           messages=[{"role": "user", "content": "A JSON object about cats."}],
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # free-form objects have no bound; what came must still be a JSON object's start
        assert reply.choices[0].message.content.startswith("{")
    out = client.completions.create(model="smollm2-135m", prompt="Call me at", max_tokens=20, temperature=1.0,
                                    extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", out.choices[0].text)
    out = client.completions.create(model="smollm2-135m", prompt="Is the sky blue?", max_tokens=5,
                                    extra_body={"structured_outputs": {"choice": [" yes", " no"]}})
    assert out.choices[0].text in (" yes", " no")
    with pytest.raises(openai.BadRequestError, match="cannot compile the json_schema"):
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "bad", "schema": {"type": 3}}})


def test_the_sdk_structured_output_keyword(pipeline):
    from tandem.sdk import Client, InvalidArgumentError

    name, schema = next(iter(SCHEMAS.items()))
    with Client(pipeline.address, timeout=300, max_retries=0) as sdk:
        reply = sdk.chat([{"role": "user", "content": f"Give me a {name.replace('_', ' ')} as JSON."}],
                         temperature=0, max_tokens=300, structured_output={"json_schema": schema})
        assert reply.finish_reason == "stop", reply.text
        jsonschema.validate(json.loads(reply.text), schema)
        out = sdk.complete("Call me at", max_tokens=20, temperature=1.0, seed=3,
                           structured_output={"regex": r" [0-9]{3}-[0-9]{4}"})
        assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", out.text) and out.finish_reason == "stop"
        out = sdk.complete("Is the sky blue?", max_tokens=5, structured_output={"choice": [" yes", " no"]})
        assert out.text in (" yes", " no")
        with pytest.raises(InvalidArgumentError, match="cannot compile the json_schema"):
            sdk.complete("x", max_tokens=4, structured_output={"json_schema": {"type": 3}})

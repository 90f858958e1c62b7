"""Schemathesis fuzzing of the gateway's OpenAPI schema (/openapi.json), bounded to run in about a
minute on the tiny model: every generated request, schema-valid or not, gets an answer that is not
a 5xx, and the schema states the server's bounds, so most schema-valid requests are accepted.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.unit.services.test_http import pipe  # noqa: F401  (the module's pipeline: the tiny model)

MAX_EXAMPLES = 25  # per operation and generation mode: ~200 requests, under a minute here
ACCEPTED: dict[str, list[int]] = {}  # operation -> statuses of its schema-valid requests


@pytest.fixture(scope="module")
def api(pipe):
    return schemathesis.openapi.from_url(f"http://{pipe.http_address}/openapi.json")


MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def operations(api, mode) -> list:
    """Every operation; negative cases need an input to break (the POST bodies)."""
    every = [result.ok() for result in api.get_all_operations()]
    return every if mode == schemathesis.GenerationMode.POSITIVE else [o for o in every if o.method.upper() == "POST"]


# Schemathesis' own pytest integration does not run under pytest 9; its strategies drive hypothesis
# here directly, one bounded run per operation and mode.
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
def test_no_request_gets_a_server_error(api, mode):
    for operation in operations(api, mode):
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            if mode == schemathesis.GenerationMode.POSITIVE:
                ACCEPTED.setdefault(operation.label, []).append(response.status_code)

        fuzz()


def test_the_schema_states_the_bounds(api, pipe):
    """The request models carry the server's limits (no bound is the server's secret)."""
    import httpx

    spec = httpx.get(f"http://{pipe.http_address}/openapi.json", timeout=10).json()
    body = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    n = body["n"]
    assert (n["minimum"], n["maximum"]) == (1, 64)
    rp = next(s for s in body["repetition_penalty"]["anyOf"] if s.get("type") == "number")
    assert rp["minimum"] > 0 and rp["maximum"] < 1e300
    stop_list = next(s for s in body["stop"]["anyOf"] if s.get("type") == "array")
    assert stop_list["maxItems"] == 16 and stop_list["items"]["maxLength"] == 256
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == 256


def test_most_schema_valid_requests_are_accepted():
    """Run after the fuzzing: of the schema-valid requests it sent, most were answered 2xx (the
    schema does not allow what the server refuses)."""
    # 403: an operation the operator left off (runtime LoRA loading without runtime_lora_dir), whatever the body
    statuses = [s for values in ACCEPTED.values() for s in values if s != 403]
    if not statuses:
        pytest.skip("run with the fuzzing test")
    accepted = sum(200 <= s < 300 for s in statuses)
    assert accepted >= len(statuses) // 2, ACCEPTED

"""Token-for-token parity with llama.cpp on hard strings (golden ids in tests/data, written by
bench/llamacpp_golden.py from llama.cpp running the same GGUF)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import TEST_DATA

GOLDEN = json.loads((TEST_DATA / "llamacpp_tokenizer_golden.json").read_text())


def test_enough_hard_cases():
    assert len(GOLDEN["cases"]) >= 40


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"][:24]))
def test_encode_matches_llamacpp(smollm_tokenizer, case):
    assert smollm_tokenizer.encode(case["text"], parse_special=case["parse_special"]) == case["ids"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"][:24]))
def test_decode_matches_llamacpp(smollm_tokenizer, case):
    # llama.cpp renders control tokens when they were parsed as such; tandem does with skip_special_tokens=False
    assert smollm_tokenizer.decode(case["ids"], skip_special_tokens=not case["parse_special"]) == case["detok"]

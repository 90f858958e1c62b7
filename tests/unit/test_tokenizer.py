"""Tokenizer behaviour on the tiny model's byte-level BPE: round trips, special tokens as text
or as tokens, BOS rules, chat templates, bad input. (Parity with llama.cpp on the real
tokenizer is tests/integration/test_tokenizer_parity.py.)"""
from __future__ import annotations

import pytest

from tandem.errors import InvalidRequestError
from tandem.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["", " ", "hello world", "  two  spaces\n\nand\ttabs", "digits 1234567 and 3.14",
         "émoji 😀👍🏽 日本語 한국어", "code: def f(x):\n    return x**2  # ok", "<|im_start|> literal"]


@pytest.fixture(scope="module")
def tok(tiny_llm) -> Tokenizer:
    return tiny_llm.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids[:1]) == "1"


def test_special_tokens_are_text_unless_asked(tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    plain = tok.encode(text)
    parsed = tok.encode(text, parse_special=True)
    im_start, im_end = tok.tokens.index("<|im_start|>"), tok.tokens.index("<|im_end|>")
    assert im_start not in plain and im_end not in plain
    assert parsed[0] == im_start and parsed[-1] == im_end
    assert tok.decode(plain) == text  # plain text decodes back verbatim
    assert tok.decode(parsed) == "user\nhi"  # control tokens are skipped by default
    assert tok.decode(parsed, skip_special_tokens=False) == text


def test_end_of_generation_ids(tok):
    assert tok.eos_id == tok.tokens.index("<|im_end|>")
    assert {tok.tokens.index("<|endoftext|>"), tok.eos_id} <= tok.eog_ids


def test_bos_only_where_the_model_wants_it(tok):
    assert not tok.add_bos and tok.bos_id is None
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}], [["user", "hi"]]])
def test_chat_template_rejects_bad_messages(tok, messages):
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages)


def test_bad_ids_and_text(tok):
    with pytest.raises(InvalidRequestError, match="out of range"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(InvalidRequestError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(InvalidRequestError, match="str"):
        tok.encode(b"bytes")


def test_incremental_detokenizer_holds_back_partial_characters(tok):
    text = "naïve 😀 日本"
    ids = tok.encode(text)
    partial = [i for i in ids if not _is_utf8(tok.token_bytes[i])]
    assert partial, "the test needs a token that is only part of a character"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_flushes_a_dangling_byte(tok):
    ids = tok.encode("😀")
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False

"""Unit tests of tandem.outputs.OutputBuilder and tandem.tokenizer.IncrementalDetokenizer with the
real SmolLM2 tokenizer: incremental UTF-8 decoding (never U+FFFD mid-stream), stop strings (also
spanning tokens), end-of-generation and stop token ids, ignore_eos, max_tokens, the context window
and skip_special_tokens; then the same rules end to end through `tiny_llm.generate`, plus seeding.
"""
from __future__ import annotations

import pytest

import tandem
from tandem.errors import InvalidRequestError
from tandem.outputs import OutputBuilder
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer

MAX_MODEL_LEN = 8192
MULTILINGUAL = "Café 東京 🎉 naïve 😀 über ok"
SENTENCE = "Hello world, the answer is 42. Goodbye."
REPLACEMENT = "\ufffd"


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def builder(tok, prompt_len: int = 5, max_model_len: int = MAX_MODEL_LEN, **params) -> OutputBuilder:
    params.setdefault("max_tokens", 1000)
    return OutputBuilder(tok, SamplingParams(**params), prompt_len, max_model_len)


def feed(b: OutputBuilder, ids: list[int]) -> list[str]:
    """Append ids until the builder finishes; return the deltas."""
    deltas = []
    for i in ids:
        deltas.append(b.append(i))
        if b.finished:
            break
    return deltas


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


@pytest.fixture(scope="module")
def eos(tok) -> int:
    assert tok.tokens[tok.eos_id] == "<|im_end|>"
    return tok.eos_id


# -- (a) incremental detokenization ------------------------------------------------------------

def test_multilingual_text_has_tokens_that_split_utf8_characters(tok):
    ids = tok.encode(MULTILINGUAL)
    partial = [i for i in ids if not is_utf8(tok.token_bytes[i])]
    assert len(partial) >= 3, "the string must exercise half-character tokens"
    assert tok.decode(ids) == MULTILINGUAL


def test_incremental_detokenizer_never_emits_replacement_and_emits_each_character_asap(tok):
    ids = tok.encode(MULTILINGUAL)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == MULTILINGUAL
    # after k tokens, exactly the complete characters of their bytes have been emitted
    for k in range(1, len(ids) + 1):
        data = tok.decode_bytes(ids[:k])
        complete = next(data[:j] for j in range(len(data), -1, -1) if is_utf8(data[:j]))
        assert "".join(deltas[:k]) == complete.decode("utf-8")
    assert any(d == "" for d in deltas)  # some tokens really were held back


def test_output_builder_deltas_never_contain_replacement_and_add_up_to_the_text(tok):
    ids = tok.encode(MULTILINGUAL)
    b = builder(tok, max_tokens=len(ids))
    deltas = feed(b, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == b.text == MULTILINGUAL
    assert b.finish_reason == "length" and b.token_ids == ids


def test_length_cut_inside_a_character_flushes_a_replacement(tok):
    ids = tok.encode("東")
    assert len(ids) > 1  # split across tokens
    b = builder(tok, max_tokens=1)
    feed(b, ids)
    assert b.finish_reason == "length" and b.text == REPLACEMENT  # flush(): U+FFFD for the incomplete char


# -- (b) stop strings --------------------------------------------------------------------------

def test_stop_string_truncates_text_before_it(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, stop=["answer"])
    feed(b, ids)
    assert b.finish_reason == "stop"
    assert b.text == "Hello world, the "
    assert b.token_ids == ids[:5]  # stops on the token that completes the stop string


def test_stop_string_spanning_two_tokens(tok):
    ids = tok.encode(SENTENCE)
    four, two = tok.encode("42")
    assert ids.count(four) == 1 and ids.index(two) == ids.index(four) + 1  # "4" and "2" are separate tokens
    b = builder(tok, stop=["42"])
    feed(b, ids)
    assert b.finish_reason == "stop"
    assert b.text == "Hello world, the answer is "
    assert b.token_ids == ids[:ids.index(two) + 1]


def test_stop_string_spanning_a_word_boundary(tok):
    ids = tok.encode(SENTENCE)
    assert tok.tokens[ids[0]] == "Hello" and tok.tokens[ids[1]] == "Ġworld"
    b = builder(tok, stop=["lo wo"])
    feed(b, ids)
    assert (b.finish_reason, b.text, b.token_ids) == ("stop", "Hel", ids[:2])


def test_earliest_of_several_stop_strings_wins(tok):
    b = builder(tok, stop=["Goodbye", "the", "is 4"])
    feed(b, tok.encode(SENTENCE))
    assert (b.finish_reason, b.text) == ("stop", "Hello world, ")


def test_absent_stop_string_runs_to_length(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, stop=["xyz"], max_tokens=len(ids))
    feed(b, ids)
    assert (b.finish_reason, b.text) == ("length", SENTENCE)


def test_stop_string_on_the_last_allowed_token_reports_stop(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, stop=[" world"], max_tokens=2)
    feed(b, ids)
    assert (b.finish_reason, b.text) == ("stop", "Hello")


def test_streamed_deltas_add_up_to_the_final_text_with_a_spanning_stop_string(tok):
    b = builder(tok, stop=["42"])
    deltas = feed(b, tok.encode(SENTENCE))
    assert "".join(deltas) == b.text


def test_append_after_finish_adds_nothing(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, stop=["42"])
    feed(b, ids)
    text = b.text
    assert b.append(ids[-1]) == ""
    assert b.text == text


# -- (c) end of generation, ignore_eos, stop_token_ids -----------------------------------------

def test_every_eog_token_stops_and_its_text_is_not_in_the_output(tok):
    assert len(tok.eog_ids) >= 2  # <|endoftext|> and <|im_end|>
    hello = tok.encode("Hello")
    for eog in sorted(tok.eog_ids):
        b = builder(tok, skip_special_tokens=False)
        deltas = feed(b, hello + [eog] + tok.encode(" world"))
        assert (b.finish_reason, b.text) == ("stop", "Hello"), tok.tokens[eog]
        assert b.token_ids == hello + [eog]
        assert "".join(deltas) == "Hello"


def test_ignore_eos_keeps_going_past_eos(tok, eos):
    b = builder(tok, ignore_eos=True, max_tokens=4)
    feed(b, tok.encode("Hello") + [eos] + tok.encode(" world, you"))
    assert b.finish_reason == "length"
    assert b.text == "Hello world,"
    assert len(b.token_ids) == 4


def test_stop_token_ids_stop_without_their_text(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, stop_token_ids=[ids[3]])  # " the"
    feed(b, ids)
    assert (b.finish_reason, b.text, b.token_ids) == ("stop", "Hello world,", ids[:4])


def test_stop_token_ids_still_apply_with_ignore_eos(tok, eos):
    ids = tok.encode(SENTENCE)
    b = builder(tok, ignore_eos=True, stop_token_ids=[ids[2]])
    feed(b, ids[:1] + [eos] + ids[1:])
    assert (b.finish_reason, b.text) == ("stop", "Hello world")


def test_eos_flushes_a_pending_partial_character(tok, eos):
    first, *_ = tok.encode("東")
    b = builder(tok)
    assert b.append(first) == ""
    assert b.append(eos) == REPLACEMENT and b.finish_reason == "stop"


# -- (d) max_tokens, (e) context window --------------------------------------------------------

def test_max_tokens_finishes_with_length(tok):
    ids = tok.encode(SENTENCE)
    b = builder(tok, max_tokens=3)
    for i in ids[:2]:
        b.append(i)
        assert not b.finished
    b.append(ids[2])
    assert (b.finish_reason, b.text, b.token_ids) == ("length", "Hello world,", ids[:3])


@pytest.mark.parametrize("prompt_len, expected_tokens", [(MAX_MODEL_LEN - 1, 1), (MAX_MODEL_LEN - 3, 3)])
def test_context_window_limits_output_before_max_tokens(tok, prompt_len, expected_tokens):
    ids = tok.encode(SENTENCE)
    b = builder(tok, prompt_len=prompt_len, max_tokens=100)
    feed(b, ids)
    assert b.finish_reason == "length"
    assert len(b.token_ids) == expected_tokens
    assert prompt_len + len(b.token_ids) == MAX_MODEL_LEN


# -- (f) skip_special_tokens -------------------------------------------------------------------

def test_skip_special_tokens_false_keeps_special_token_text(tok, eos):
    ids = tok.encode("Hello") + [eos] + tok.encode(" world")
    b = builder(tok, ignore_eos=True, skip_special_tokens=False)
    feed(b, ids)
    assert b.text == "Hello<|im_end|> world" and not b.finished


def test_skip_special_tokens_true_drops_special_token_text(tok, eos):
    ids = tok.encode("Hello") + [eos] + tok.encode(" world")
    b = builder(tok, ignore_eos=True)
    feed(b, ids)
    assert b.text == "Hello world"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert [detok.add(i) for i in ids] == ["Hello", "<|im_end|>", " world"]


# -- end to end through tiny_llm.generate ------------------------------------------------------

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def greedy_run(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    return params, tiny_llm.generate(PROMPT, params)[0]


def replay(tokenizer, params: SamplingParams, prompt_len: int, max_model_len: int, ids: list[int]) -> OutputBuilder:
    b = OutputBuilder(tokenizer, params, prompt_len, max_model_len)
    feed(b, ids)
    return b


def test_generate_matches_output_builder_replay(tiny_llm, greedy_run):
    params, out = greedy_run
    assert out.finish_reason == "length" and len(out.token_ids) == 20
    b = replay(tiny_llm.tokenizer, params, len(out.prompt_token_ids), tiny_llm.max_model_len, out.token_ids)
    assert (b.text, b.finish_reason, b.token_ids) == (out.text, out.finish_reason, out.token_ids)


def test_generate_max_tokens_is_a_prefix_of_the_longer_greedy_run(tiny_llm, greedy_run):
    _, full = greedy_run
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = tiny_llm.generate(PROMPT, params)[0]
    assert out.finish_reason == "length" and out.token_ids == full.token_ids[:5]
    b = replay(tiny_llm.tokenizer, params, len(out.prompt_token_ids), tiny_llm.max_model_len, full.token_ids)
    assert out.text == b.text


def test_generate_stop_string_spanning_tokens(tiny_llm, greedy_run):
    _, full = greedy_run
    tok = tiny_llm.tokenizer
    pieces = [tok.token_bytes[i] for i in full.token_ids]
    # the first boundary between two printable-ASCII tokens: stop on "last char + first char"
    k = next(k for k in range(1, len(pieces))
             if all(p and p.isascii() and p.decode().isprintable() for p in pieces[k - 1:k + 1]))
    stop = pieces[k - 1].decode()[-1] + pieces[k].decode()[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    out = tiny_llm.generate(PROMPT, params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
    assert stop not in out.text
    n = next(n for n in range(1, 21) if stop in tok.decode(full.token_ids[:n]))
    assert out.token_ids == full.token_ids[:n]
    b = replay(tok, params, len(out.prompt_token_ids), tiny_llm.max_model_len, full.token_ids)
    assert (b.text, b.finish_reason, b.token_ids) == (out.text, out.finish_reason, out.token_ids)


def test_generate_same_seed_is_reproducible_and_another_seed_differs(tiny_llm):
    def run(seed):
        return tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=seed, max_tokens=20))[0]

    first, again, other = run(123), run(123), run(124)
    assert (first.token_ids, first.text) == (again.token_ids, again.text)
    assert first.token_ids != other.token_ids


def test_generate_seeded_prompt_is_independent_of_batch_mates(tiny_llm):
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate(PROMPT, seeded)[0]
    batch = tiny_llm.generate(["Hello there", PROMPT],
                              [SamplingParams(temperature=0.8, max_tokens=7), seeded])
    assert batch[1].token_ids == alone.token_ids


def test_generate_stops_at_the_context_window(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), max_model_len=16, progress=False)
    prompt = llm.tokenize(PROMPT)
    prompt = (prompt * 16)[:14]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 2
    with pytest.raises(InvalidRequestError, match="context window"):
        llm.generate([(prompt * 2)[:16]], SamplingParams(max_tokens=1))

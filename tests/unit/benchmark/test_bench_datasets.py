"""tandem.benchmark.datasets: lengths in range, the same prompts for the same seed, exact lengths
with a tokenizer, and prompts from the text that ships with tandem and from user files."""
from __future__ import annotations

import json

import pytest

from tandem.benchmark.config import BenchConfig
from tandem.benchmark.datasets import WORDS, load_requests, read_dataset
from tandem.data import SHAKESPEARE, SQUAD_QUESTIONS


def char_encode(text: str) -> list[int]:
    """A tokenizer with one token per character: far from the 4 characters per token estimate."""
    return [ord(c) for c in text]


def test_random_lengths_follow_the_range_ratio():
    config = BenchConfig(input_len=100, output_len=20, range_ratio=0.5)
    requests = load_requests(config, 400)
    prompt_lens = [r.prompt_len for r in requests]
    output_lens = [r.output_len for r in requests]
    assert min(prompt_lens) >= 50 and max(prompt_lens) <= 150 and len(set(prompt_lens)) > 40
    assert min(output_lens) >= 10 and max(output_lens) <= 30
    assert all(len(r.prompt.split()) == r.prompt_len for r in requests)  # N random words for N tokens
    assert all(w in WORDS for w in requests[0].prompt.split())


def test_range_ratio_zero_gives_exact_lengths():
    requests = load_requests(BenchConfig(input_len=7, output_len=3), 20)
    assert {(r.prompt_len, r.output_len) for r in requests} == {(7, 3)}


def test_the_same_seed_gives_the_same_prompts():
    first = load_requests(BenchConfig(seed=3, input_len=32, range_ratio=0.2), 10)
    again = load_requests(BenchConfig(seed=3, input_len=32, range_ratio=0.2), 10)
    other = load_requests(BenchConfig(seed=4, input_len=32, range_ratio=0.2), 10)
    assert first == again and first != other
    assert len({r.prompt for r in first}) == 10  # every request a fresh prompt: no prefix-cache hits


def test_random_prompts_are_cut_to_exact_token_counts_with_a_tokenizer():
    requests = load_requests(BenchConfig(input_len=40, range_ratio=0.3), 30, encode=char_encode)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in requests)
    assert all(28 <= r.prompt_len <= 52 for r in requests)


def test_shared_data_is_the_shipped_text_cut_into_windows():
    text = SHAKESPEARE.read_text()
    requests = load_requests(BenchConfig(dataset="shared", input_len=64, output_len=8), 20)
    assert all(r.prompt in text and not r.prompt[0].isspace() for r in requests)
    assert all(abs(r.prompt_len - 64) <= 1 for r in requests)  # 4 characters per token, estimated
    assert len({r.prompt for r in requests}) == 20
    exact = load_requests(BenchConfig(dataset="shared", input_len=300), 5, encode=char_encode)
    assert [len(r.prompt) for r in exact] == [300] * 5 == [r.prompt_len for r in exact]  # the window grew
    assert all("".join(map(chr, r.prompt)) in text for r in exact)


def test_a_directory_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma delta " * 50)
    (tmp_path / "b.md").write_text("one two three four five " * 50)
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    texts, records = read_dataset(tmp_path)
    assert len(texts) == 2 and records == []
    requests = load_requests(BenchConfig(dataset="shared", dataset_path=str(tmp_path), input_len=8), 30)
    assert {r.prompt.split()[0] for r in requests} <= {"alpha", "beta", "gamma", "delta", "one", "two", "three",
                                                       "four", "five"}


def test_jsonl_records_are_prompts_as_they_are():
    path = SQUAD_QUESTIONS
    questions = {json.loads(line)["question"] for line in path.read_text().splitlines()}
    requests = load_requests(BenchConfig(dataset="shared", dataset_path=str(path), output_len=16), 50)
    assert all(r.prompt in questions and r.output_len == 16 for r in requests)
    assert len({r.prompt for r in requests}) == 50  # shuffled, without repeats while records last


def test_sharegpt_conversations_take_the_reply_length(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": "Paris is the capital of France."}]},
        {"conversations": [{"from": "human", "value": "Say hi"}]},
        {"id": "no turns"},
    ]))
    requests = load_requests(BenchConfig(dataset="sharegpt", dataset_path=str(path)), 4, encode=char_encode)
    by_prompt = {r.prompt: r for r in requests}
    assert set(by_prompt) == {"What is the capital of France?", "Say hi"}  # cycled: 4 requests of 2 records
    assert by_prompt["What is the capital of France?"].output_len == len("Paris is the capital of France.")
    assert by_prompt["What is the capital of France?"].prompt_len == len("What is the capital of France?")
    assert by_prompt["Say hi"].output_len == 64  # no reply: the default
    fixed = load_requests(BenchConfig(dataset="sharegpt", dataset_path=str(path), output_len=5), 2)
    assert {r.output_len for r in fixed} == {5}


def test_missing_or_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_requests(BenchConfig(dataset="shared", dataset_path=str(tmp_path / "nope.txt")), 1)
    with pytest.raises(ValueError, match="no .txt"):
        load_requests(BenchConfig(dataset="shared", dataset_path=str(tmp_path)), 1)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"unrelated": 1}) + "\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_requests(BenchConfig(dataset="sharegpt", dataset_path=str(tmp_path / "empty.jsonl")), 1)

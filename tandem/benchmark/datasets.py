"""The prompts a benchmark sends, as SampleRequests (vLLM's benchmarks/datasets.py, smaller):

- random: prompts of random common English words, input and output lengths drawn uniformly from
  [len * (1 - range_ratio), len * (1 + range_ratio)] as vLLM's random dataset does.
- shared: windows of real text cut at random places; by default the Shakespeare that ships with
  tandem (`tandem.data.SHAKESPEARE`, 250 KB), or any `--dataset-path`: a text file, a directory of
  .txt/.md files, or a JSON/JSONL file of records (one prompt each).
- sharegpt: a JSON/JSONL file of {"conversations": [{"from": "human", "value": ...}, ...]}: the first
  turn is the prompt, the reply's length the output length (unless --output-len is given).
- mixed: short chat turns and long documents, as a chat service with document uploads sees them:
  each request is, with probability `long_fraction`, a window of input_len tokens of the shared
  text (Shakespeare, or --dataset-path's text), else a question from the SQuAD dev subset that
  ships with tandem (`tandem.data.SQUAD_QUESTIONS`, 5-30 tokens) as it is.

With an `encode` function (the server's tokenizer; the tandem backend has one) random and text
prompts are cut to exactly their input length in tokens and sent as token ids. Without one they
stay text and their lengths are estimates; servers that report usage correct them per request.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.benchmark.config import DEFAULT_OUTPUT_LEN, BenchConfig
from tandem.data import SHAKESPEARE, SQUAD_QUESTIONS

Encode = Callable[[str], list[int]]
CHARS_PER_TOKEN = 4  # English text in a ~50k-token BPE vocabulary: the usual rule of thumb
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json")
PROMPT_KEYS = ("prompt", "question", "text", "input", "instruction", "content")
REPLY_KEYS = ("completion", "output", "response", "answer")
# Common English words, each one token in most BPE vocabularies: random prompts of N words are
# about N tokens even where no tokenizer is at hand.
WORDS = tuple("""the of and to in is was for on that with as by at from his he it an are were which be this
had not or but have their one they its all new also first has been her more after who she two other
time would there can into when world some year people city state over most only years between
during many may then three part about later these such same under known made both since through
while well where what them being before war house life found work against each school called until
long small great team music party began old high name series water right place early back play
government south north general four number way day end point best second system left built film
public because home side form another following own large became area national""".split())


@dataclass
class SampleRequest:
    """One prompt: text, or token ids once fitted to the server's tokenizer. prompt_len is exact
    then, an estimate otherwise; output_len becomes the request's max_tokens."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def load_requests(config: BenchConfig, count: int, encode: Encode | None = None) -> list[SampleRequest]:
    """`count` requests of `config.dataset`, the same ones for the same seed."""
    rng = np.random.default_rng(config.seed)
    if config.dataset == "random":
        return [_random_prompt(rng, n, encode, out) for n, out in zip(*_lengths(config, count, rng))]
    path = Path(config.dataset_path).expanduser() if config.dataset_path else SHAKESPEARE
    texts, records = read_dataset(path)
    if config.dataset == "mixed":
        return _mixed_requests(config, texts, count, rng, encode)
    if config.dataset == "sharegpt" or records:
        return _record_requests(records, count, config.output_len, rng, encode)
    return [_text_prompt(texts, rng, n, encode, out) for n, out in zip(*_lengths(config, count, rng))]


def read_dataset(path: Path) -> tuple[list[str], list[tuple[str, str | None]]]:
    """(texts to cut windows from, records as (prompt, reference reply or None)) of a file or a
    directory (its .txt/.md files; else its .json/.jsonl files)."""
    if not path.exists():
        raise ValueError(f"--dataset-path {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES) or \
            sorted(p for p in path.iterdir() if p.suffix in RECORD_SUFFIXES)
        if not files:
            raise ValueError(f"--dataset-path {path}: no .txt, .md, .json or .jsonl files in it")
    else:
        files = [path]
    texts, records = [], []
    for file in files:
        if file.suffix in RECORD_SUFFIXES:
            records += _read_records(file)
        else:
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
    if not any(texts) and not records:
        raise ValueError(f"--dataset-path {path}: no prompts found")
    return texts, records


def _lengths(config: BenchConfig, count: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    out_len = config.output_len or DEFAULT_OUTPUT_LEN
    return _uniform(config.input_len, config.range_ratio, count, rng), _uniform(out_len, config.range_ratio, count, rng)


def _uniform(length: int, ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    low, high = max(1, int(np.floor(length * (1 - ratio)))), max(1, int(np.ceil(length * (1 + ratio))))
    return [int(x) for x in rng.integers(low, high + 1, size=count)]


def _random_prompt(rng: np.random.Generator, num_tokens: int, encode: Encode | None, output_len: int) -> SampleRequest:
    words = list(rng.choice(WORDS, size=num_tokens))
    if encode is None:
        return SampleRequest(" ".join(words), num_tokens, output_len)
    while len(ids := encode(" ".join(words))) < num_tokens:  # each word is at least one token: rare
        words += list(rng.choice(WORDS, size=num_tokens))
    return SampleRequest(ids[:num_tokens], num_tokens, output_len)


def _text_prompt(texts: list[str], rng: np.random.Generator, num_tokens: int, encode: Encode | None,
                 output_len: int) -> SampleRequest:
    sizes = np.array([len(t) for t in texts], dtype=np.float64)
    text = texts[int(rng.choice(len(texts), p=sizes / sizes.sum()))]
    num_chars = num_tokens * CHARS_PER_TOKEN
    start = _word_start(text, int(rng.integers(0, max(1, len(text) - num_chars))))
    while True:
        window = text[start:start + num_chars]
        if encode is None:
            return SampleRequest(window, max(1, round(len(window) / CHARS_PER_TOKEN)), output_len)
        ids = encode(window)
        if len(ids) >= num_tokens or start + num_chars >= len(text):
            return SampleRequest(ids[:num_tokens], len(ids[:num_tokens]), output_len)
        num_chars *= 2  # a tokenizer with fewer characters per token than the estimate


def _word_start(text: str, start: int) -> int:
    """The first word's start at or after `start` (whole words only: a window never opens mid-word)."""
    i = start
    if i > 0 and not text[i - 1].isspace():
        while i < len(text) and not text[i].isspace():
            i += 1
    while i < len(text) and text[i].isspace():
        i += 1
    return i if i < len(text) else start


def _mixed_requests(config: BenchConfig, texts: list[str], count: int, rng: np.random.Generator,
                    encode: Encode | None) -> list[SampleRequest]:
    """Long documents (input_len-token windows of `texts`) with probability long_fraction, else
    short chat turns (SQuAD questions); the output length of both is config's."""
    if not any(texts):
        raise ValueError("--dataset mixed cuts its long documents from text: --dataset-path must hold text files")
    questions = [prompt for prompt, _ in _read_records(SQUAD_QUESTIONS)]
    long_lens, out_lens = _lengths(config, count, rng)
    is_long = rng.random(count) < config.long_fraction
    requests = []
    for i in range(count):
        if is_long[i]:
            requests.append(_text_prompt(texts, rng, long_lens[i], encode, out_lens[i]))
            continue
        question = questions[int(rng.integers(len(questions)))]
        if encode is None:
            requests.append(SampleRequest(question, max(1, round(len(question) / CHARS_PER_TOKEN)), out_lens[i]))
        else:
            ids = encode(question)
            requests.append(SampleRequest(ids, len(ids), out_lens[i]))
    return requests


def _record_requests(records: list[tuple[str, str | None]], count: int, output_len: int | None,
                     rng: np.random.Generator, encode: Encode | None) -> list[SampleRequest]:
    if not records:
        raise ValueError("the dataset has no records with a prompt (and, for sharegpt, a reply)")
    order = rng.permutation(len(records))
    requests = []
    for i in range(count):  # cycles through the shuffled records when count exceeds them
        prompt, reply = records[int(order[i % len(records)])]
        prompt_len = len(encode(prompt)) if encode else max(1, round(len(prompt) / CHARS_PER_TOKEN))
        if output_len is None and reply:
            out = len(encode(reply)) if encode else round(len(reply) / CHARS_PER_TOKEN)
        else:
            out = output_len or DEFAULT_OUTPUT_LEN
        requests.append(SampleRequest(prompt, prompt_len, max(1, out)))
    return requests


def _read_records(path: Path) -> list[tuple[str, str | None]]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        data = json.loads(raw)
        items = data if isinstance(data, list) else next(
            (data[k] for k in ("paragraphs", "data", "conversations", "records") if isinstance(data.get(k), list)), [])
    return [record for item in items if isinstance(item, dict) and (record := _record(item)) is not None]


def _record(item: dict) -> tuple[str, str | None] | None:
    turns = item.get("conversations") or item.get("messages")
    if isinstance(turns, list):
        texts = [t.get("value") or t.get("content") for t in turns if isinstance(t, dict)]
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        return (texts[0], texts[1] if len(texts) > 1 else None) if texts else None
    prompt = next((item[k] for k in PROMPT_KEYS if isinstance(item.get(k), str) and item[k].strip()), None)
    reply = next((item[k] for k in REPLY_KEYS if isinstance(item.get(k), str)), None)
    return (prompt, reply) if prompt else None

"""tandem bench's mixed workload (short chat turns and long documents) and the route share a
tandem pipeline reports (issue 16 item 5)."""
from __future__ import annotations

import pytest

from tandem.benchmark.backends import OpenAIBackend
from tandem.benchmark.config import BenchConfig
from tandem.benchmark.datasets import load_requests
from tandem.benchmark.metrics import RequestRecord, summarize
from tandem.data import SHAKESPEARE, SQUAD_QUESTIONS


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_mixed_is_questions_and_long_windows_in_the_asked_share():
    config = BenchConfig(dataset="mixed", input_len=300, output_len=8, long_fraction=0.3, seed=1)
    requests = load_requests(config, 400, char_encode)
    long = [r for r in requests if r.prompt_len == 300]
    short = [r for r in requests if r.prompt_len < 300]
    assert len(long) + len(short) == 400 and 0.22 < len(long) / 400 < 0.38
    text, questions = SHAKESPEARE.read_text(), SQUAD_QUESTIONS.read_text()
    assert all("".join(map(chr, r.prompt)) in text for r in long)
    assert all(f'"question": "{"".join(map(chr, r.prompt))}"' in questions for r in short[:20])
    assert max(r.prompt_len for r in short) < 200 and {r.output_len for r in requests} == {8}
    assert load_requests(config, 400, char_encode) == requests  # the same seed, the same workload


def test_mixed_ends_at_the_fractions_edges_and_checks_them():
    assert all(r.prompt_len == 50 for r in load_requests(BenchConfig(dataset="mixed", input_len=50,
                                                                     long_fraction=1.0), 20, char_encode))
    assert all(r.prompt_len < 200 for r in load_requests(BenchConfig(dataset="mixed", input_len=500,
                                                                     long_fraction=0.0), 20, char_encode))
    with pytest.raises(ValueError, match="--long-fraction"):
        BenchConfig(dataset="mixed", long_fraction=1.5)
    with pytest.raises(ValueError, match="--disaggregate"):
        BenchConfig(disaggregate="sometimes")


def test_the_disaggregated_share_counts_requests_that_reported_a_route():
    def record(route):
        r = RequestRecord(prompt_len=10)
        r.add_delta(0.1, 1)
        r.disaggregated = route
        return r.finish()

    metrics = summarize([record(True), record(False), record(False), record(True), record(None)], 1.0, [50])
    assert metrics["disaggregated_fraction"] == 0.5
    assert summarize([record(None)], 1.0, [50])["disaggregated_fraction"] is None


def test_the_openai_backend_sends_the_policy_and_reads_the_route():
    backend = OpenAIBackend(BenchConfig(backend="openai", disaggregate="never"), chat=False)
    backend.model = "m"
    assert backend.payload(load_requests(BenchConfig(input_len=4), 1)[0])["disaggregate"] == "never"
    record, usage = RequestRecord(), {}

    class Event:
        event, data = None, '{"choices": [], "usage": {"routes": [{"disaggregated": true, "reason": "always"}]}}'
    assert backend._apply(Event(), record, 0.1, usage) is None and record.disaggregated is True

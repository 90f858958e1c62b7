"""tandem.benchmark.metrics and config: the numbers of a measurement on hand-made records, checked
against values worked out by hand (vLLM's definitions), and the parsing of the list flags."""
from __future__ import annotations

import math

import pytest

from tandem.benchmark.config import (BenchConfig, parse_concurrencies, parse_goodput, parse_percentiles,
                                     parse_rates)
from tandem.benchmark.metrics import RequestRecord, meets_slos, summarize


def done(ttft: float, e2el: float, output_tokens: int, prompt_len: int = 10, itl=()) -> RequestRecord:
    return RequestRecord(success=True, prompt_len=prompt_len, output_tokens=output_tokens, ttft=ttft, e2el=e2el,
                         itl=list(itl), chunk_tokens=[1] * output_tokens)


def test_percentiles_interpolate_linearly_in_milliseconds():
    records = [done(ttft=0.1 * i, e2el=0.1 * i + 1, output_tokens=2) for i in range(1, 11)]  # TTFT 100..1000 ms
    m = summarize(records, duration=10.0, percentiles=[50, 90, 99])
    assert m["mean_ttft_ms"] == pytest.approx(550)
    assert m["median_ttft_ms"] == pytest.approx(550)
    assert m["p50_ttft_ms"] == pytest.approx(550)
    assert m["p90_ttft_ms"] == pytest.approx(910)  # 900 + 0.1 * (1000 - 900)
    assert m["p99_ttft_ms"] == pytest.approx(991)
    assert m["std_ttft_ms"] == pytest.approx(287.228, rel=1e-4)
    assert m["mean_e2el_ms"] == pytest.approx(1550)


def test_throughputs_are_totals_over_the_duration():
    records = [done(0.1, 1.0, output_tokens=8, prompt_len=100), done(0.2, 2.0, output_tokens=4, prompt_len=50),
               RequestRecord().fail("HTTP 503", "overloaded")]
    m = summarize(records, duration=4.0, percentiles=[99])
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (150, 12)  # failed requests count nothing
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["input_throughput"] == pytest.approx(37.5)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(40.5)
    assert m["request_goodput"] is None  # no SLOs given


def test_tpot_excludes_the_first_token_and_is_undefined_for_one_token():
    assert done(ttft=0.2, e2el=1.0, output_tokens=5).tpot == pytest.approx(0.2)  # (1.0 - 0.2) / 4
    single = done(ttft=0.3, e2el=0.3, output_tokens=1)
    assert single.tpot is None
    m = summarize([done(0.2, 1.0, 5), single], duration=1.0, percentiles=[50])
    assert m["mean_tpot_ms"] == pytest.approx(200)  # the one-token request is left out
    assert m["mean_ttft_ms"] == pytest.approx(250)  # but its TTFT counts


def test_goodput_counts_completed_requests_meeting_every_slo():
    records = [done(0.1, 0.5, 5), done(0.4, 2.0, 5), done(0.6, 0.7, 5), done(0.3, 0.3, 1),
               RequestRecord().fail("Timeout", "slow")]
    slos = {"ttft": 500.0, "tpot": 300.0}
    # TPOTs: 100 ms, 400 ms (misses), 25 ms but TTFT 600 (misses), undefined (meets, as in vLLM)
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    m = summarize(records, duration=2.0, percentiles=[50], slos_ms=slos)
    assert m["request_goodput"] == pytest.approx(1.0)  # 2 good requests / 2 s
    assert summarize(records, 2.0, [50], {"e2el": 600.0})["request_goodput"] == pytest.approx(1.0)


def test_itl_is_one_gap_per_delta_and_multi_token_deltas_count_all_tokens():
    record = RequestRecord(prompt_len=7)
    for elapsed, num_tokens in ((0.5, 1), (0.6, 3), (0.8, 1), (1.1, 2)):
        record.add_delta(elapsed, num_tokens)
    record.finish()
    assert record.success and record.output_tokens == 7 and record.ttft == 0.5 and record.e2el == 1.1
    assert record.itl == pytest.approx([0.1, 0.2, 0.3])
    assert record.tpot == pytest.approx(0.6 / 6)
    m = summarize([record], duration=1.1, percentiles=[50])
    assert m["mean_itl_ms"] == pytest.approx(200) and m["mean_tokens_per_chunk"] == pytest.approx(7 / 4)


def test_usage_from_the_server_wins_over_counted_chunks():
    record = RequestRecord(prompt_len=12)
    record.add_delta(0.1, 1)
    record.add_delta(0.2, 1)
    record.finish(output_tokens=5, prompt_tokens=14)
    assert (record.output_tokens, record.prompt_len) == (5, 14)


def test_a_stream_without_content_is_a_failure():
    record = RequestRecord().finish(output_tokens=3)
    assert not record.success and record.error_type == "NoContent"


def test_errors_are_counted_by_type_with_an_example():
    records = [RequestRecord().fail("HTTP 503", "busy"), RequestRecord().fail("HTTP 503", "busy again"),
               RequestRecord().fail("UnavailableError", "UNAVAILABLE: gone"), done(0.1, 0.2, 2)]
    m = summarize(records, duration=1.0, percentiles=[50])
    assert m["errors"] == {"HTTP 503": 2, "UnavailableError": 1}
    assert m["error_examples"] == {"HTTP 503": "busy", "UnavailableError": "UNAVAILABLE: gone"}


def test_no_completed_requests_give_empty_statistics():
    m = summarize([RequestRecord().fail("Timeout", "x")], duration=1.0, percentiles=[50, 99])
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None


def test_list_flags_parse_and_reject_bad_values():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    assert parse_concurrencies("1,4,none") == [1, 4, None]
    assert parse_percentiles("50,99.9") == [50.0, 99.9]
    assert parse_goodput(["ttft:500", "TPOT:50", "e2e:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in ("0", "-1", "fast", ""):
        with pytest.raises(ValueError, match="--request-rate"):
            parse_rates(bad)
    with pytest.raises(ValueError, match="--max-concurrency"):
        parse_concurrencies("2.5")
    with pytest.raises(ValueError, match="--percentiles"):
        parse_percentiles("101")
    for bad in (["itl:5"], ["ttft"], ["ttft:abc"], ["ttft:0"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_config_defaults_and_checks(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    openai = BenchConfig(backend="openai", result_file="out/r.json", base_url="http://h:1/")
    assert openai.ignore_eos is False and openai.api_key == "sk-env" and openai.plot == "out/r.png"
    assert openai.base_url == "http://h:1" and "api_key" not in openai.to_json()
    tandem = BenchConfig(request_rates=[1.0, math.inf], max_concurrencies=[None, 4])
    assert tandem.ignore_eos is True and tandem.result_file.startswith("bench-tandem-")
    assert tandem.loads == [(1.0, None), (1.0, 4), (math.inf, None), (math.inf, 4)]
    assert tandem.to_json()["request_rates"] == [1.0, "inf"]
    with pytest.raises(ValueError, match="--dataset-path"):
        BenchConfig(dataset="sharegpt")
    with pytest.raises(ValueError, match="--range-ratio"):
        BenchConfig(range_ratio=1.0)
    with pytest.raises(ValueError, match="--backend"):
        BenchConfig(backend="grpc")

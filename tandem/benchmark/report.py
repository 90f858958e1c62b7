"""What a benchmark run leaves behind: vLLM's result table per measurement, a one-line-per-load
summary of a sweep, the JSON result file, and a PNG of latency and throughput against the load.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tandem.benchmark.metrics import percentile_key
from tandem.benchmark.runner import BenchmarkResult, Measurement

WIDTH = 50  # vLLM's table width
_SECTIONS = (("ttft", "Time to First Token", "TTFT"),
             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"),
             ("e2el", "End-to-end Latency", "E2EL"))


def format_table(m: Measurement, percentiles: list[float]) -> str:
    """The measurement as vLLM prints it (`============ Serving Benchmark Result ============`)."""
    x = m.metrics
    rows = [_title(" Serving Benchmark Result ", "="),
            _row("Offered load:", m.label),
            _row("Successful requests:", x["completed"]),
            _row("Failed requests:", x["failed"]),
            _row("Benchmark duration (s):", f"{x['duration']:.2f}"),
            _row("Total input tokens:", x["total_input_tokens"]),
            _row("Total generated tokens:", x["total_output_tokens"]),
            _row("Request throughput (req/s):", f"{x['request_throughput']:.2f}")]
    if x["request_goodput"] is not None:
        rows.append(_row("Request goodput (req/s):", f"{x['request_goodput']:.2f}"))
    rows += [_row("Input token throughput (tok/s):", f"{x['input_throughput']:.2f}"),
             _row("Output token throughput (tok/s):", f"{x['output_throughput']:.2f}"),
             _row("Total Token throughput (tok/s):", f"{x['total_token_throughput']:.2f}")]
    if x.get("disaggregated_fraction") is not None:  # a tandem pipeline's routes (usage)
        rows.append(_row("Disaggregated requests (%):", f"{100 * x['disaggregated_fraction']:.1f}"))
    for metric, title, short in _SECTIONS:
        rows.append(_title(title, "-"))
        rows.append(_row(f"Mean {short} (ms):", _ms(x[f"mean_{metric}_ms"])))
        rows.append(_row(f"Median {short} (ms):", _ms(x[f"median_{metric}_ms"])))
        rows += [_row(f"P{p:g} {short} (ms):", _ms(x[f"{percentile_key(p)}_{metric}_ms"]))
                 for p in percentiles if p != 50]  # p50 is the median, printed above
    if x["errors"]:
        rows.append(_title("Errors", "-"))
        for kind, count in x["errors"].items():
            rows.append(_row(f"{kind}:", count))
            rows.append(f"  e.g. {x['error_examples'][kind][:WIDTH * 2]}")
    rows.append("=" * WIDTH)
    return "\n".join(rows)


def format_sweep(result: BenchmarkResult) -> str:
    """One line per load: throughput and the headline latencies (ms: medians and the highest
    percentile asked for), for comparing a sweep."""
    tail = max(result.config.percentiles)
    header = (f"{'load':<28}{'ok':>6}{'fail':>6}{'req/s':>8}{'out tok/s':>11}"
              f"{'TTFT p50':>10}{'TTFT p' + f'{tail:g}':>10}{'TPOT p50':>10}{'ITL p50':>9}{'ITL p' + f'{tail:g}':>9}")
    lines = [header]
    for m in result.measurements:
        x = m.metrics
        lines.append(f"{m.label:<28}{x['completed']:>6}{x['failed']:>6}{x['request_throughput']:>8.2f}"
                     f"{x['output_throughput']:>11.1f}{_ms(x['median_ttft_ms']):>10}{_ms(_get(x, tail, 'ttft')):>10}"
                     f"{_ms(x['median_tpot_ms']):>10}{_ms(x['median_itl_ms']):>9}{_ms(_get(x, tail, 'itl')):>9}")
    return "\n".join(lines)


def to_json(result: BenchmarkResult, save_requests: bool) -> dict:
    """The result file: the settings, and per measurement its load and metrics (and, with
    save_requests, every request's record)."""
    out = {"date": result.date, "backend": result.config.backend, "model": result.model,
           "config": result.config.to_json(), "measurements": []}
    for m in result.measurements:
        entry = {"label": m.label, "request_rate": "inf" if math.isinf(m.request_rate) else m.request_rate,
                 "max_concurrency": m.max_concurrency, **m.metrics}
        if save_requests:
            entry["requests"] = [r.to_json() for r in m.records]
        out["measurements"].append(entry)
    return out


def write_json(result: BenchmarkResult, path: str | Path, save_requests: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result, save_requests), indent=2) + "\n")
    return path


def write_plot(result: BenchmarkResult, path: str | Path) -> Path:
    """Three panels against the offered load: TTFT p50 and tail (the highest --percentiles, p99 by
    default); ITL p50 and tail with median TPOT; output tokens/s with requests/s. Loads are
    categories ("rate 4", "rate inf, concurrency 8"), so an infinite rate has its place."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state to touch

    tail = percentile_key(max(result.config.percentiles))
    labels = [m.label for m in result.measurements]
    xs = list(range(len(labels)))
    fig = Figure(figsize=(15, 4.5))
    ax_ttft, ax_itl, ax_tput = fig.subplots(1, 3)
    for ax, series in ((ax_ttft, [("TTFT p50", "median_ttft_ms"), (f"TTFT {tail}", f"{tail}_ttft_ms")]),
                       (ax_itl, [("ITL p50", "median_itl_ms"), (f"ITL {tail}", f"{tail}_itl_ms"),
                                 ("TPOT p50", "median_tpot_ms")])):
        for name, key in series:
            ax.plot(xs, [_nan(m.metrics.get(key)) for m in result.measurements], marker="o", label=name)
        ax.set_ylabel("ms")
    ax_tput.plot(xs, [m.metrics["output_throughput"] for m in result.measurements], marker="o", color="C2",
                 label="output tok/s")
    ax_tput.set_ylabel("output tokens/s")
    ax_req = ax_tput.twinx()
    ax_req.plot(xs, [m.metrics["request_throughput"] for m in result.measurements], marker="s", color="C3",
                label="requests/s")
    ax_req.set_ylabel("requests/s")
    for ax, title in ((ax_ttft, "Time to first token"), (ax_itl, "Inter-token latency, TPOT"), (ax_tput, "Throughput")):
        ax.set_title(title)
        ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("offered load")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    ax_req.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"tandem bench: {result.config.backend}, {result.model or 'default model'}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)  # Agg renders PNG without a pyplot backend
    return path


def _title(text: str, fill: str) -> str:
    return f"{text:{fill}^{WIDTH}}"


def _row(name: str, value) -> str:
    return f"{name:<40}{value}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _get(metrics: dict, p: float, metric: str) -> float | None:
    return metrics.get(f"{percentile_key(p)}_{metric}_ms")

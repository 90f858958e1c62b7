"""What one streamed request measured (RequestRecord) and the numbers a measurement reports
(summarize), with vLLM's definitions (benchmarks/benchmark_serving.py, calculate_metrics):

- TTFT: from sending the request to the first delta that carries content.
- ITL: the gap between consecutive content deltas, one per delta. A delta may carry several
  tokens (speculative decoding, a server that batches its flushes): its gap is still one ITL, and
  the tokens all count towards output tokens and TPOT.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined with one output token (left out of the TPOT
  statistics, and counted as meeting a TPOT objective, as vLLM does).
- E2E latency (e2el): from sending to the last content delta.
- goodput: completed requests per second that meet every objective given (`--goodput`).
Throughputs divide totals by the measurement's duration: first send to last completion.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

MS = 1000.0
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """One request's outcome. Times are seconds: `start` from the measurement's start, the others
    from the request's own send. `chunk_tokens[i]` is the tokens the i-th content delta carried."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    start: float = 0.0
    error_type: str | None = None
    error: str | None = None
    disaggregated: bool | None = None  # a tandem pipeline's route for it (usage); None: not reported

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None with fewer than two tokens."""
        if not self.success or self.output_tokens < 2 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def add_delta(self, elapsed: float, num_tokens: int) -> None:
        """A content delta of `num_tokens` arrived `elapsed` seconds after the send."""
        if self.ttft is None:
            self.ttft = elapsed
        else:
            self.itl.append(elapsed - self.e2el)
        self.e2el = elapsed
        self.chunk_tokens.append(num_tokens)

    def finish(self, output_tokens: int | None = None, prompt_tokens: int | None = None) -> RequestRecord:
        """The stream ended: token counts from the server's usage where it reported them."""
        if self.ttft is None:
            return self.fail("NoContent", "the stream ended without any content")
        self.success = True
        self.output_tokens = output_tokens if output_tokens else sum(self.chunk_tokens)
        self.prompt_len = prompt_tokens if prompt_tokens else self.prompt_len
        return self

    def fail(self, error_type: str, message: str) -> RequestRecord:
        self.success, self.error_type, self.error = False, error_type, message
        return self

    def to_json(self) -> dict:
        return {**asdict(self), "tpot": self.tpot}


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every objective (milliseconds); undefined TPOT meets it."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
    return all(values[name] is not None and values[name] * MS <= limit for name, limit in slos_ms.items())


def _fraction(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def percentile_key(p: float) -> str:
    return f"p{p:g}"


def latency_stats(values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean, median, std and each percentile of `values_s`, in milliseconds (None when empty).
    Percentiles interpolate linearly between samples (numpy's default, as vLLM)."""
    keys = ["mean", "median", "std"] + [percentile_key(p) for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * MS
    stats = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    stats.update({percentile_key(p): float(np.percentile(ms, p)) for p in percentiles})
    return stats


def summarize(records: list[RequestRecord], duration: float, percentiles: list[float],
              slos_ms: dict[str, float] | None = None) -> dict:
    """The measurement's metrics, flat and JSON-ready, under vLLM's result-file names:
    completed, failed, request_throughput, output_throughput, mean_ttft_ms, p99_itl_ms, ...,
    plus `errors` ({type: count}) and `error_examples` ({type: first message})."""
    done = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    duration = max(duration, 1e-9)
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    num_chunks = sum(len(r.chunk_tokens) for r in done)
    out = {
        "completed": len(done), "failed": len(failed), "duration": duration,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "request_goodput": (sum(meets_slos(r, slos_ms) for r in done) / duration) if slos_ms else None,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "mean_tokens_per_chunk": total_output / num_chunks if num_chunks else None,
        "disaggregated_fraction": _fraction([r.disaggregated for r in done if r.disaggregated is not None]),
    }
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done if r.e2el is not None],
    }
    for metric in LATENCY_METRICS:
        for stat, value in latency_stats(series[metric], percentiles).items():
            out[f"{stat}_{metric}_ms"] = value
    counts = Counter(r.error_type or "Error" for r in failed)
    out["errors"] = dict(counts.most_common())
    out["error_examples"] = {}
    for r in failed:
        out["error_examples"].setdefault(r.error_type or "Error", r.error or "")
    return out

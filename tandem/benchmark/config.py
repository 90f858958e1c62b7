"""BenchConfig: every setting of one `tandem bench` run, typed and checked on construction, and the
parsers of the flags that take lists (`--request-rate 1,2,inf`, `--goodput ttft:500 tpot:50`).

Names and defaults follow vLLM's benchmark_serving.py where tandem has the same knob; input and
output lengths default smaller (256 and 64) because the default model serves on a CPU.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("tandem", "openai", "openai-chat")
DATASETS = ("random", "shared", "sharegpt", "mixed")
DISAGGREGATE = ("auto", "always", "never")  # a tandem pipeline's route policies (services.routing)
SLO_METRICS = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys; milliseconds
_SLO_ALIASES = {"e2e": "e2el"}
DEFAULT_OUTPUT_LEN = 64


class BenchmarkError(Exception):
    """The benchmark cannot run (the server is down, the model is unknown, no request completed):
    `tandem bench` prints the message and exits with status 1."""


def parse_rates(text: str) -> list[float]:
    """`1,2,4,inf` -> [1.0, 2.0, 4.0, inf]: requests per second, each > 0; inf sends all at once."""
    return _numbers(text, "--request-rate", "numbers > 0 (inf: all at once)", lambda rate: rate > 0)


def parse_concurrencies(text: str) -> list[int | None]:
    """`1,4,16` -> [1, 4, 16]; `none` (or 0) means no cap."""
    values: list[int | None] = []
    for item in _items(text, "--max-concurrency"):
        if item.lower() in ("none", "0", "inf"):
            values.append(None)
            continue
        if not item.isdigit():
            raise ValueError(f"--max-concurrency takes positive integers or none, got {item!r}")
        values.append(int(item))
    return values


def parse_percentiles(text: str) -> list[float]:
    """`50,90,99` -> [50.0, 90.0, 99.0], each in (0, 100]."""
    return _numbers(text, "--percentiles", "numbers in (0, 100]", lambda p: 0 < p <= 100)


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0}: service-level objectives in ms."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = _SLO_ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {name}: {value!r} is not a number of milliseconds") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput {name} must be > 0 ms, got {value!r}")
    return slos


def _numbers(text: str, flag: str, allowed: str, is_allowed) -> list[float]:
    values = []
    for item in _items(text, flag):
        try:
            value = float(item)
        except ValueError:
            value = math.nan  # allowed by no rule
        if not is_allowed(value):
            raise ValueError(f"{flag} takes {allowed}, got {item!r}")
        values.append(value)
    return values


def _items(text: str, flag: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise ValueError(f"{flag} needs at least one value")
    return items


@dataclass
class BenchConfig:
    """One run: where to send, what to send, how fast, and where the results go.

    Each (request_rate, max_concurrency) pair of the two lists is one measurement of num_prompts
    fresh requests; num_warmups requests go first, once, and are not counted.
    """

    backend: str = "tandem"
    target: str = "127.0.0.1:50051"  # tandem: the gateway's gRPC address
    base_url: str = "http://127.0.0.1:8000"  # openai, openai-chat
    model: str | None = None  # openai: default the first of GET /v1/models
    api_key: str | None = None  # default $TANDEM_API_KEY (tandem) or $OPENAI_API_KEY (openai)
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    num_warmups: int = 0
    input_len: int = 256
    output_len: int | None = None  # None: DEFAULT_OUTPUT_LEN, or a sharegpt reply's length
    range_ratio: float = 0.0
    long_fraction: float = 0.25  # mixed: the share of long documents among the requests
    disaggregate: str | None = None  # tandem's per-request route policy; None: the server's setting
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    max_concurrencies: list[int | None] = field(default_factory=lambda: [None])
    burstiness: float = 1.0
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool | None = None  # None: on for tandem, off for OpenAI servers (not all accept it)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    goodput: dict[str, float] = field(default_factory=dict)
    request_timeout: float = 600.0
    result_file: str | None = None  # None: bench-<backend>-<timestamp>.json
    plot: str | None = None  # None: the result file with .png
    save_requests: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        _check(self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        _check(self.dataset != "sharegpt" or self.dataset_path is not None,
               "--dataset sharegpt needs --dataset-path (a JSON or JSONL file of conversations)")
        _check(self.num_prompts >= 1, f"--num-prompts must be >= 1, got {self.num_prompts}")
        _check(self.num_warmups >= 0, f"--num-warmups must be >= 0, got {self.num_warmups}")
        _check(self.input_len >= 1, f"--input-len must be >= 1, got {self.input_len}")
        _check(self.output_len is None or self.output_len >= 1, f"--output-len must be >= 1, got {self.output_len}")
        _check(0 <= self.range_ratio < 1, f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        _check(0 <= self.long_fraction <= 1, f"--long-fraction must be in [0, 1], got {self.long_fraction}")
        _check(self.disaggregate is None or self.disaggregate in DISAGGREGATE,
               f"--disaggregate must be one of {', '.join(DISAGGREGATE)}, got {self.disaggregate!r}")
        _check(bool(self.request_rates) and all(r > 0 for r in self.request_rates), "--request-rate must be > 0")
        _check(bool(self.max_concurrencies) and all(c is None or c >= 1 for c in self.max_concurrencies),
               "--max-concurrency must be >= 1")
        _check(self.burstiness > 0, f"--burstiness must be > 0 (1 = Poisson), got {self.burstiness}")
        _check(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        _check(self.request_timeout > 0, f"--request-timeout must be > 0, got {self.request_timeout}")
        _check(all(0 < p <= 100 for p in self.percentiles), "--percentiles must be in (0, 100]")
        _check(set(self.goodput) <= set(SLO_METRICS), f"--goodput metrics are {', '.join(SLO_METRICS)}")
        if self.ignore_eos is None:
            self.ignore_eos = self.backend == "tandem"
        if self.api_key is None:
            self.api_key = os.environ.get("TANDEM_API_KEY" if self.backend == "tandem" else "OPENAI_API_KEY")
        if self.result_file is None:
            self.result_file = f"bench-{self.backend}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        if self.plot is None:
            self.plot = str(Path(self.result_file).with_suffix(".png"))
        self.base_url = self.base_url.rstrip("/")

    @property
    def loads(self) -> list[tuple[float, int | None]]:
        """The measurements, in order: every (request rate, concurrency cap) pair."""
        return [(rate, cap) for rate in self.request_rates for cap in self.max_concurrencies]

    def to_json(self) -> dict:
        """The settings as JSON values (inf as the string "inf"); the API key is never written."""
        out = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        out["request_rates"] = [_json_rate(r) for r in self.request_rates]
        return out


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

"""The `tandem bench` subcommand: flags (vLLM's `vllm bench serve` names where they mean the same)
-> BenchConfig -> run_benchmark -> the table on stdout, the JSON result file and the PNG.

Bad flags raise ValueError (tandem's CLI prints one line and exits 2); a server that cannot be
used prints `tandem: error: ...` and exits 1, as does a run in which no request completed.
Only argparse is imported until the command runs.
"""
from __future__ import annotations

import argparse
import sys

EXIT_FAILED = 1

EXAMPLES = """examples:
  tandem bench --num-prompts 50 --request-rate 1,2,4,inf                 # a tandem gateway on :50051
  tandem bench --max-concurrency 1,4,16 --dataset shared --input-len 512
  tandem bench --dataset mixed --long-fraction 0.2 --input-len 1024 --request-rate 0.5 --disaggregate auto
  tandem bench --backend openai --base-url http://127.0.0.1:8000 --ignore-eos --goodput ttft:500 tpot:50
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to the `tandem` command's subparsers."""
    p = subparsers.add_parser(
        "bench", help="load-test a server: TTFT, TPOT, ITL, throughput, goodput (like vLLM's benchmark_serving)",
        description="Send streamed requests to a tandem gateway (gRPC) or an OpenAI-compatible server (HTTP) "
        "at one or more offered loads, print vLLM-style result tables, and write JSON and a PNG.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("server")
    target.add_argument("--backend", choices=["tandem", "openai", "openai-chat"], default="tandem",
                        help="tandem: the gateway over gRPC; openai: POST /v1/completions; "
                        "openai-chat: POST /v1/chat/completions (default: tandem)")
    target.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="the tandem gateway (default: %(default)s)")
    target.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the OpenAI-compatible server (default: %(default)s)")
    target.add_argument("--model", default=None, help="model name (default: the server's first)")
    target.add_argument("--api-key", default=None,
                        help="API key (default: $TANDEM_API_KEY for tandem, $OPENAI_API_KEY for openai)")
    target.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    data = p.add_argument_group("prompts")
    data.add_argument("--dataset", "--dataset-name", choices=["random", "shared", "sharegpt", "mixed"],
                      default="random",
                      help="random words; shared: windows of real text (tandem.data's Shakespeare, or --dataset-path); "
                      "sharegpt: conversations from --dataset-path; mixed: short chat turns (SQuAD questions) and "
                      "--long-fraction long documents of --input-len tokens (default: random)")
    data.add_argument("--dataset-path", default=None, metavar="FILE_OR_DIR",
                      help="a text file, a directory of .txt/.md files, or a JSON/JSONL file of records")
    data.add_argument("--num-prompts", type=int, default=100, help="requests per measurement (default: 100)")
    data.add_argument("--num-warmups", type=int, default=0, help="requests sent first and not counted (default: 0)")
    data.add_argument("--input-len", type=int, default=256, help="prompt tokens (default: 256)")
    data.add_argument("--output-len", type=int, default=None,
                      help="max_tokens per request (default: 64; sharegpt: the reference reply's length)")
    data.add_argument("--range-ratio", type=float, default=0.0,
                      help="draw lengths uniformly from len*(1-r)..len*(1+r) (default: 0, exact)")
    data.add_argument("--long-fraction", type=float, default=0.25,
                      help="--dataset mixed: the share of long documents (default: 0.25)")
    data.add_argument("--disaggregate", choices=["auto", "always", "never"], default=None,
                      help="a tandem pipeline's route for every request: auto, always (prefill worker -> decode "
                      "worker) or never (one decode worker) (default: the server's setting)")
    data.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    data.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                      help="generate exactly --output-len tokens (default: on for tandem; off for openai, "
                      "since not every server accepts it)")
    data.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default: 0)")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                      help="requests/s, Poisson arrivals; inf sends all at once; a list is a sweep (default: inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 steadier (default: 1)")
    load.add_argument("--max-concurrency", default="none", metavar="C[,C...]",
                      help="requests in flight at most; a list is a sweep (default: none)")
    out = p.add_argument_group("results")
    out.add_argument("--percentiles", "--metric-percentiles", default="50,90,99", metavar="P[,P...]",
                     help="latency percentiles to report (default: 50,90,99)")
    out.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:2000 (milliseconds)")
    out.add_argument("--result-file", default=None, help="JSON results (default: bench-<backend>-<time>.json)")
    out.add_argument("--plot", default=None, help="PNG of latency and throughput vs load (default: beside the JSON)")
    out.add_argument("--save-requests", action="store_true", help="put every request's record in the JSON")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(args):
    from tandem.benchmark.config import (BenchConfig, parse_concurrencies, parse_goodput, parse_percentiles,
                                         parse_rates)

    return BenchConfig(
        backend=args.backend, target=args.target, base_url=args.base_url, model=args.model, api_key=args.api_key,
        dataset=args.dataset, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
        num_warmups=args.num_warmups, input_len=args.input_len, output_len=args.output_len,
        range_ratio=args.range_ratio, long_fraction=args.long_fraction, disaggregate=args.disaggregate,
        request_rates=parse_rates(args.request_rate),
        max_concurrencies=parse_concurrencies(args.max_concurrency), burstiness=args.burstiness, seed=args.seed,
        temperature=args.temperature, ignore_eos=args.ignore_eos, percentiles=parse_percentiles(args.percentiles),
        goodput=parse_goodput(args.goodput), request_timeout=args.request_timeout, result_file=args.result_file,
        plot=args.plot, save_requests=args.save_requests, progress=args.progress)


def run(args) -> int:
    """`tandem bench`: returns the exit status."""
    from tandem.benchmark.config import BenchmarkError
    from tandem.benchmark.report import format_sweep, format_table, write_json, write_plot
    from tandem.benchmark.runner import run_benchmark

    config = config_from_args(args)
    try:
        result = run_benchmark(config, on_measurement=lambda m: print(format_table(m, config.percentiles), flush=True))
    except BenchmarkError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if len(result.measurements) > 1:
        print(format_sweep(result))
    print(f"results: {write_json(result, config.result_file, config.save_requests)}")
    print(f"plot: {write_plot(result, config.plot)}")
    if not any(m.metrics["completed"] for m in result.measurements):
        errors = {k: v for m in result.measurements for k, v in m.metrics["error_examples"].items()}
        print(f"tandem: error: no request completed ({'; '.join(f'{k}: {v}' for k, v in errors.items())})",
              file=sys.stderr)
        return EXIT_FAILED
    return 0

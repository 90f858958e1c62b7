"""The `tandem` command line: one module per command group, one parser.

    generate.py  generate, chat     the in-process engine (or a gateway, with --server)
    model.py     model info
    plugins.py   plugins list
    serve.py     serve, service     the pipeline; its flags come from PipelineConfig's fields
    rag.py       rag ingest|query|eval|rebuild
    tandem.benchmark.cli            bench

Each module's `add_parsers(subparsers)` adds its commands and sets `handler` on them. Bad input
prints one line (`tandem: error: ...`) and exits with status 2, like argparse does. Only argparse
and the config dataclasses are imported until a command runs.
"""
from __future__ import annotations

import argparse
import sys

from tandem.benchmark.cli import add_parser as add_bench_parser
from tandem.cli import generate, model, plugins, rag, serve
from tandem.cli.serve import pipeline_config
from tandem.settings import parse_options

EXIT_USAGE = 2

_pipeline_config = pipeline_config  # the name tests and scripts imported from the one-module CLI

__all__ = ["EXIT_USAGE", "build_parser", "main", "parse_options", "pipeline_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="tandem: an LLM inference serving pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parsers(sub)
    model.add_parsers(sub)
    plugins.add_parsers(sub)
    serve.add_parsers(sub)
    rag.add_parsers(sub)
    add_bench_parser(sub).set_defaults(handler=_bench)
    return parser


def _bench(args) -> int:
    from tandem.benchmark.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as exc:  # every bad-input error of tandem is a ValueError
        print(f"tandem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130

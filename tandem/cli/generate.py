"""`tandem generate` and `tandem chat`: the in-process engine (tandem.LLM) on the terminal, or a
running gateway (`generate --server`).

The model flags are PipelineConfig's model settings (the same names, help and checks as in
`tandem serve`), with tandem.LLM's defaults where they differ from a pipeline worker's
(LIBRARY_DEFAULTS; tests/unit/test_settings.py checks both against LLM's signature). The sampling
flags are SamplingParams' fields.
"""
from __future__ import annotations

import argparse
import json
import sys

from tandem import settings

# The PipelineConfig settings that are tandem.LLM's keyword arguments of the same name.
MODEL_SETTINGS = ("model", "dtype", "device", "num_threads", "quantization", "quantization_options", "attention",
                  "attention_options", "attention_backend", "kv_cache_dtype", "tensor_parallel_size",
                  "pipeline_parallel_size", "expert_parallel_size", "parallel_backend", "parallel_timeout_s")
LIBRARY_DEFAULTS = {"device": "cpu"}  # tandem.LLM's own: a pipeline worker's "auto" takes the GPU Ray gave it


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="complete a prompt (in-process, or on a server with --server) and print it")
    gen.add_argument("prompt", help="the prompt text")
    server = gen.add_argument_group("server")
    server.add_argument("--server", default=None, metavar="HOST:PORT",
                        help="a running tandem gateway (tandem serve) to ask instead of loading the model here")
    server.add_argument("--api-key", default=None, help="API key for --server (default: $TANDEM_API_KEY)")
    server.add_argument("--tls", default=None, metavar="CA_PEM|system",
                        help="use TLS for --server: a root certificate file, or 'system' for the system roots")
    server.add_argument("--timeout", type=float, default=None, help="deadline in seconds for --server")
    add_model_flags(gen)
    _add_sampling_args(gen, max_tokens=64)
    gen.set_defaults(handler=cmd_generate)

    chat = sub.add_parser("chat", help="chat with the model on the terminal (Ctrl-D quits)")
    chat.add_argument("--system", default=None, help="system message")
    add_model_flags(chat)
    _add_sampling_args(chat, max_tokens=256)
    chat.set_defaults(handler=cmd_chat)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    from tandem.services.config import PipelineConfig  # the settings' declarations; no service starts

    settings.add_flags(p, PipelineConfig, only=MODEL_SETTINGS, defaults=LIBRARY_DEFAULTS, config_keys=False)


def llm_kwargs(args) -> dict:
    """tandem.LLM's keyword arguments from the model flags given; the others keep LLM's defaults."""
    from tandem.services.config import PipelineConfig

    return settings.from_flags(args, PipelineConfig, only=MODEL_SETTINGS)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p = p.add_argument_group("sampling")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p filter in [0, 1]; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    p.add_argument("--logits-processor", action="append", default=[], metavar="NAME[=JSON]",
                   help='turn on a plugin logits processor, e.g. typical_p=\'{"mass": 0.9}\' (repeatable)')
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "k": 5}\' or draft_model; "none": off')


def _sampling_params(args):
    from tandem.sampling_params import SamplingParams

    processors = {}
    for item in args.logits_processor:
        name, _, raw = item.partition("=")
        try:
            processors[name] = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"--logits-processor {name}: the arguments are not JSON ({exc})") from None
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, logits_processors=processors,
                          speculative="default" if args.speculative is None else settings.parse_json(
                              args.speculative, "--speculative"))


def _load(args):
    from tandem.llm import LLM

    return LLM(progress=sys.stderr.isatty(), **llm_kwargs(args))


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # validate before loading the model
    if args.server:
        return _generate_remote(args, params)
    out = _load(args).generate(args.prompt, params)[0]
    print(args.prompt + out.text)
    return 0


def _generate_remote(args, params) -> int:
    import dataclasses
    import os

    from tandem.sdk import Client, TandemRpcError

    tls = None if args.tls is None else (True if args.tls == "system" else args.tls)
    sampling = {k: v for k, v in dataclasses.asdict(params).items() if v not in (None, [], {})}
    if params.speculative is None:  # off for this request: say so, "unset" would mean the server's default
        sampling["speculative"] = None
    with Client(args.server, api_key=args.api_key or os.environ.get("TANDEM_API_KEY"), tls=tls,
                timeout=args.timeout) as client:
        print(args.prompt, end="", flush=True)
        try:
            for chunk in client.generate(args.prompt, **sampling):
                if chunk.index == 0 and chunk.text:
                    print(chunk.text, end="", flush=True)
        except TandemRpcError as exc:
            print(f"\ntandem: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print()
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params).text
        messages.append({"role": "assistant", "content": reply})
        print(("model> " if interactive else "") + reply, flush=True)

"""The `tandem` command line: generate, chat, model info, plugins list, serve.

Bad input prints one line (`tandem: error: ...`) and exits with status 2, like argparse does.
"""
from __future__ import annotations

import argparse
import json
import sys

from tandem.model.registry import DEFAULT_MODEL

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"short name, .gguf file or HF directory (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--quantization", default=None,
                   help="re-quantize the weights with a quantizer plugin: int8, int4, nf4, fp8, ... (default: none)")
    p.add_argument("--quantization-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the quantizer, e.g. group_size=64 (repeatable)")
    p.add_argument("--attention", default=None,
                   help="attention variant plugin: causal, sliding_window, sinks, alibi, local_global, ... "
                        "(default: the model's own)")
    p.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the variant, e.g. window=256 (repeatable)")
    p.add_argument("--attention-backend", default="sdpa", help="sdpa (default), naive (the reference), or a plugin's")
    p.add_argument("--kv-cache-dtype", default="auto", help="KV-cache format: auto (the model's dtype) or int8")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="tandem: an LLM inference serving pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt in-process and print the text")
    gen.add_argument("prompt", help="the prompt text")
    _add_model_args(gen)
    _add_sampling_args(gen, max_tokens=64)

    chat = sub.add_parser("chat", help="chat with the model on the terminal (Ctrl-D quits)")
    chat.add_argument("--system", default=None, help="system message")
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=256)

    model = sub.add_parser("model", help="model commands")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="architecture, sizes and memory needed (loads no weights)")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    info.add_argument("--dtype", default="float32", help="dtype weights and KV are held in (default: float32)")
    info.add_argument("--tokens", type=int, default=None, help="KV tokens to plan for (default: context length)")

    plugins = sub.add_parser("plugins", help="plugin commands")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", required=True)
    listing = plugins_sub.add_parser("list", help="every plugin and component: category, source, whether it loaded")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    serve = sub.add_parser("serve", help="serve the model (for now: the in-process engine on the terminal)")
    _add_model_args(serve)
    _add_sampling_args(serve, max_tokens=256)
    serve.set_defaults(system=None)
    return parser


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
                          seed=args.seed, stop=args.stop, logits_processors=processors)


def parse_options(items: list[str], flag: str) -> dict:
    """KEY=VALUE pairs; values are JSON where they parse (numbers, true/false), else strings."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load(args):
    from tandem.llm import LLM

    return LLM(args.model, dtype=args.dtype, num_threads=args.threads, progress=sys.stderr.isatty(),
               quantization=args.quantization,
               quantization_options=parse_options(args.quantization_option, "--quantization-option"),
               attention=args.attention, attention_options=parse_options(args.attention_option, "--attention-option"),
               attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype)


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # validate before loading the model
    out = _load(args).generate(args.prompt, params)[0]
    print(args.prompt + out.text)
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


def cmd_model_info(args) -> int:
    from tandem.model.loader import open_model_source, parse_dtype
    from tandem.model.registry import resolve_model_path

    path = resolve_model_path(args.model)
    source = open_model_source(path)
    c = source.config()
    dtype_bytes = parse_dtype(args.dtype).itemsize
    tokens = args.tokens if args.tokens is not None else c.max_position
    if tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {tokens}")
    weights = c.num_params() * dtype_bytes
    kv_per_token = c.kv_bytes_per_token(dtype_bytes)
    rope = c.rope_scaling.kind if c.rope_scaling.kind == "none" else f"{c.rope_scaling.kind} x{c.rope_scaling.factor}"
    rows = [
        ("model", c.name), ("file", str(path)), ("architecture", c.architecture),
        ("stored tensors", ", ".join(f"{k} x{v}" for k, v in sorted(source.tensor_types().items()))),
        ("file weight bytes", f"{source.num_tensor_bytes() / 2**20:.1f} MiB"),
        ("parameters", f"{c.num_params() / 1e6:.1f} M"),
        ("layers", c.num_layers), ("hidden size", c.hidden_size), ("intermediate size", c.intermediate_size),
        ("attention heads", f"{c.num_heads} query, {c.num_kv_heads} key/value, head dim {c.head_dim}"),
        ("vocabulary", c.vocab_size), ("context length", c.max_position),
        ("rope", f"theta {c.rope_theta:g}, scaling {rope}"), ("tied embeddings", c.tie_word_embeddings),
        (f"weights in memory ({args.dtype})", f"{weights / 2**20:.1f} MiB"),
        (f"KV bytes per token ({args.dtype})", f"{kv_per_token} (2 x {c.num_layers} layers x {c.num_kv_heads} "
                                               f"kv heads x {c.head_dim} x {dtype_bytes} B)"),
        (f"memory for {tokens} KV tokens", f"{(weights + kv_per_token * tokens) / 2**20:.1f} MiB "
                                           "(weights + 2*layers*kv_heads*head_dim*tokens*bytes)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_plugins_list(args) -> int:
    from tandem.plugins import get_plugin_manager

    plugins = get_plugin_manager().plugins.values()
    rows = []
    for info in plugins:
        status = "loaded" if info.loaded else f"FAILED: {info.error}"
        for category, name in info.components or [("-", "-")]:
            rows.append({"category": category, "name": name, "plugin": info.name, "source": info.source,
                         "loaded": info.loaded, "status": status})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("category", "name", "plugin", "source", "status")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths.get(c, 0)) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in columns).rstrip())
    return 0


def cmd_serve(args) -> int:
    print("tandem serve: the gRPC/HTTP service pipeline is not built yet; running the in-process "
          "engine as a terminal chat instead (Ctrl-D quits).", file=sys.stderr)
    return cmd_chat(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"model": cmd_model_info, "plugins": cmd_plugins_list}.get(args.command) or COMMANDS[args.command]
    try:
        return handler(args)
    except ValueError as exc:  # every bad-input error of tandem is a ValueError
        print(f"tandem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

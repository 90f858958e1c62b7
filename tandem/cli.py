"""The `tandem` command line: generate, chat, model info, plugins list, serve, service, bench.

Bad input prints one line (`tandem: error: ...`) and exits with status 2, like argparse does.
"""
from __future__ import annotations

import argparse
import json
import sys

from tandem.benchmark.cli import add_parser as add_bench_parser
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
    p.add_argument("--attention-backend", default="sdpa",
                   help="sdpa (default), naive (the reference), triton (GPU kernels), or a plugin's")
    p.add_argument("--kv-cache-dtype", default="auto", help="KV-cache format: auto (the model's dtype) or int8")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (a GPU when there is one)")


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
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "k": 5}\' or draft_model; "none": off')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="tandem: an LLM inference serving pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt (in-process, or on a server with --server) and print it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--server", default=None, metavar="HOST:PORT",
                     help="a running tandem gateway (tandem serve) to ask instead of loading the model here")
    gen.add_argument("--api-key", default=None, help="API key for --server (default: $TANDEM_API_KEY)")
    gen.add_argument("--tls", default=None, metavar="CA_PEM|system",
                     help="use TLS for --server: a root certificate file, or 'system' for the system roots")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds for --server")
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
    listing = plugins_sub.add_parser("list", help="every plugin and component: category, source, whether it "
                                                   "loaded, or why not (a failed plugin's components are listed)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--config", default=None, help="a tandem.yaml: list what its `plugins:` allowlist loads")
    listing.add_argument("--plugin", action="append", default=None, metavar="NAME",
                         help="list what this allowlist loads (repeatable; overrides --config's)")

    serve = sub.add_parser("serve", help="start the pipeline on Ray (one actor per service) and the gateway",
                           description="Start local Ray (or join --ray-address) with one actor per service: "
                           "tokenizer, prefill, decode, KV-cache store, draft, retrieval, and the gateway (gRPC). "
                           "Every flag can also be set in the --config YAML file (key = flag name with "
                           "underscores); flags win. Ctrl-C stops everything.")
    _add_pipeline_args(serve)
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    serve.add_argument("--replicas", action="append", default=[], metavar="ROLE=N",
                       help="replicas per role: prefill=N, decode=N (repeatable; default 1 each)")
    serve.add_argument("--dashboard", action="store_true", default=None, help="start Ray's dashboard (off by default)")
    serve.add_argument("--object-store-memory", type=int, default=None,
                       help="Ray object store bytes (default: 10%% of available memory, at most 1 GiB)")

    rag = sub.add_parser("rag", help="retrieval (RAG): ingest documents, query, evaluate, rebuild the index")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True)
    ingest = rag_sub.add_parser("ingest", help="add documents (.txt, .md, .jsonl with id/title/text) to the store")
    ingest.add_argument("paths", nargs="+", help="files; re-ingesting a document id replaces it")
    query = rag_sub.add_parser("query", help="the chunks that best answer a question")
    query.add_argument("question")
    query.add_argument("--k", type=int, default=5, help="chunks to return, 1..100 (default 5)")
    query.add_argument("--json", action="store_true", help="print JSON")
    evaluate = rag_sub.add_parser("eval", help="recall@1, recall@k and MRR of a question set on a fresh store")
    evaluate.add_argument("questions", help="JSON lines: question, paragraph_id, is_impossible")
    evaluate.add_argument("--corpus", required=True, help='JSON: {"paragraphs": [{"id", "title", "text"}, ...]}')
    evaluate.add_argument("--k", type=int, default=5)
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    rebuild = rag_sub.add_parser("rebuild", help="rebuild the vector index from the document store")
    for p_ in (ingest, query, rebuild):
        p_.add_argument("--data-dir", default="~/.local/share/tandem/rag", help="the store (default: %(default)s)")
    for p_ in (ingest, query, evaluate):
        p_.add_argument("--collection", default="default", help="collection name (default: %(default)s)")
    for p_ in (query, evaluate):
        p_.add_argument("--no-hybrid", dest="hybrid", action="store_false", help="vector ranking only (no BM25)")
    for p_ in (ingest, query, evaluate, rebuild):
        p_.add_argument("--onnx-cache-dir", default=None, help="ONNX export cache (default ~/.cache/tandem/onnx)")
        p_.add_argument("--embedder", default=None, help="embedder plugin (default: all-MiniLM-L6-v2)")

    service = sub.add_parser("service", help="run one service as a plain gRPC server (no Ray)",
                             description="Run one service of the pipeline standalone. The gateway needs "
                             "--tokenizer and --decode (and --prefill when disaggregated); workers need "
                             "--kv-store in disaggregated mode.")
    service.add_argument("name", choices=["tokenizer", "prefill", "decode", "worker", "kvstore", "draft",
                                          "retrieval", "gateway"],
                         help="worker = prefill and decode in one process (aggregated mode)")
    service.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    _add_pipeline_args(service)
    service.add_argument("--kv-store", default=None, metavar="HOST:PORT", help="the KV-cache store's address")
    service.add_argument("--tokenizer", default=None, metavar="HOST:PORT", help="the tokenizer service (gateway)")
    service.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT",
                         help="a prefill worker (gateway; repeatable)")
    service.add_argument("--decode", action="append", default=[], metavar="HOST:PORT",
                         help="a decode worker, or an aggregated one (gateway; repeatable)")
    service.add_argument("--retrieval", default=None, metavar="HOST:PORT", help="the retrieval service (gateway: rag)")
    service.add_argument("--draft", default=None, metavar="HOST:PORT",
                         help="the draft service (workers: speculative method remote)")
    add_bench_parser(sub)
    return parser


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The PipelineConfig flags: every default is None, so the YAML file's values stand unless set."""
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config file (keys = flag names)")
    p.add_argument("--model", default=None, help=f"model name, .gguf file or HF directory (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    p.add_argument("--threads", dest="num_threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--quantization", default=None, help="quantizer plugin: int8, int4, nf4, fp8, ...")
    p.add_argument("--quantization-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attention", default=None, help="attention variant plugin (default: the model's own)")
    p.add_argument("--attention-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attention-backend", default=None, help="sdpa (default), naive, triton (GPU kernels), or a plugin's")
    p.add_argument("--device", default=None, help="where workers run: auto (default: a GPU when the worker has one), "
                   "cpu, cuda")
    p.add_argument("--kv-cache-dtype", default=None, help="auto (default) or int8")
    p.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV pool per worker (default 512 MiB)")
    p.add_argument("--mode", choices=["disaggregated", "aggregated"], default=None,
                   help="separate prefill and decode workers (default), or one worker doing both")
    p.add_argument("--host", default=None, help="address the gateway binds (default 127.0.0.1: loopback only)")
    p.add_argument("--grpc-port", type=int, default=None, help="the gateway's gRPC port (default 50051)")
    p.add_argument("--http-port", type=int, default=None, help="the gateway's HTTP port: the OpenAI-compatible API, /metrics and /health (default 8000; "
                   "0: any free port; http_port: null in the YAML turns HTTP off)")
    p.add_argument("--api-key", dest="api_keys", action="append", default=None,
                   help="accept this API key (repeatable); also api_key_file and $TANDEM_API_KEYS")
    p.add_argument("--api-key-file", default=None, help="file with one API key per line")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--internal-token-file", default=None, metavar="FILE",
                   help="the pipeline token internal services require (also internal_token in the YAML, "
                   "$TANDEM_INTERNAL_TOKEN; `tandem serve` makes one when none is set)")
    p.add_argument("--internal-tls-cert", default=None, metavar="PEM",
                   help="mutual TLS between services: this service's certificate (with --internal-tls-key/-ca)")
    p.add_argument("--internal-tls-key", default=None, metavar="PEM", help="the key of --internal-tls-cert")
    p.add_argument("--internal-tls-ca", default=None, metavar="PEM", help="the CA that signed every service's certificate")
    p.add_argument("--kv-store-bytes", type=int, default=None, help="KV-cache store capacity (default 1 GiB)")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="samples (n per prompt) in flight at the gateway before RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--http-request-timeout-s", type=float, default=None, metavar="SECONDS",
                   help="an HTTP request's deadline: 504 after it (default 600)")
    p.add_argument("--max-message-bytes", type=int, default=None, help="gRPC message limit (default 16 MiB)")
    p.add_argument("--drain-grace-s", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, how long requests in flight may finish before the services stop "
                        "(default 30)")
    p.add_argument("--rag-data-dir", default=None, help="the retrieval service's store (default ~/.local/share/tandem/rag)")
    p.add_argument("--onnx-cache-dir", default=None, help="the embedder's ONNX export cache (default ~/.cache/tandem/onnx)")
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='the requests\' default speculative decoding, e.g. \'{"method": "ngram", "k": 5}\'; '
                   'method "remote" runs the proposer in the draft service')
    p.add_argument("--speculative-method", dest="speculative_methods", action="append", default=None,
                   metavar="NAME", help="a speculative method requests may pick (repeatable; default: "
                   "--speculative's and ngram); requests never set a proposer's options")
    p.add_argument("--plugin", dest="plugins", action="append", default=None, metavar="NAME",
                   help="load this third-party plugin (repeatable): only the listed ones load, since a "
                   "plugin runs code with the server's rights (default: every installed one)")


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
                          speculative="default" if args.speculative is None else _json_arg(args.speculative,
                                                                                           "--speculative"))


def _json_arg(raw: str, flag: str):
    if raw.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not JSON ({exc})") from None


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
               attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype, device=args.device)


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

    allow = args.plugin
    if allow is None and args.config:
        from tandem.services.config import PipelineConfig

        allow = PipelineConfig.load(args.config).plugins
    rows = [row for info in get_plugin_manager(allow).plugins.values() for row in info.rows()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("category", "name", "plugin", "source", "status")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths.get(c, 0)) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in columns).rstrip())
    return 0


_PIPELINE_KEYS = ("model", "dtype", "device", "num_threads", "quantization", "attention", "attention_backend", "kv_cache_dtype",
                  "max_model_len", "kv_cache_memory", "mode", "host", "grpc_port", "http_port", "api_keys",
                  "api_key_file", "tls_cert", "tls_key", "kv_store_bytes", "max_inflight", "max_message_bytes",
                  "ray_address", "dashboard", "object_store_memory", "rag_data_dir", "onnx_cache_dir",
                  "internal_token_file", "internal_tls_cert", "internal_tls_key", "internal_tls_ca",
                  "http_request_timeout_s", "speculative_methods", "plugins", "drain_grace_s")


def _pipeline_config(args):
    from tandem.services.config import PipelineConfig

    overrides = {k: getattr(args, k) for k in _PIPELINE_KEYS if hasattr(args, k)}
    if args.quantization_option:
        overrides["quantization_options"] = parse_options(args.quantization_option, "--quantization-option")
    if args.attention_option:
        overrides["attention_options"] = parse_options(args.attention_option, "--attention-option")
    if args.speculative is not None:
        overrides["speculative"] = _json_arg(args.speculative, "--speculative") or {"method": "none"}
    if getattr(args, "replicas", None):
        replicas = parse_options(args.replicas, "--replicas")
        overrides["replicas"] = replicas
    return PipelineConfig.load(args.config, **overrides)


def cmd_serve(args) -> int:
    from tandem.orchestration.ray_launcher import serve

    return serve(_pipeline_config(args), out=lambda line: print(line, flush=True))


def cmd_service(args) -> int:
    import logging
    import signal
    import threading

    from tandem.services import build
    from tandem.services.credentials import is_loopback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = _pipeline_config(args)
    peers = {"kvstore": args.kv_store, "tokenizer": args.tokenizer, "prefill": args.prefill, "decode": args.decode,
             "retrieval": args.retrieval, "draft": args.draft}
    host = config.host if args.name == "gateway" else (args.host or config.service_host)
    if args.name != "gateway" and not is_loopback(host) and not config.internal_credentials():
        raise ValueError(f"refusing to serve {args.name} on {host} without the pipeline's credentials: anyone who "
                         "can reach it could use it. Set internal_token (or internal_token_file, "
                         "$TANDEM_INTERNAL_TOKEN) or mutual TLS (internal_tls_cert/key/ca), or listen on 127.0.0.1")
    server = build(args.name, config, port=args.port, peers=peers, host=host, exit_on_fatal=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"tandem: {args.name} listening on {server.address} (gRPC). Ctrl-C stops.", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


def cmd_rag(args) -> int:
    import dataclasses
    import tempfile
    from pathlib import Path

    from tandem.rag import RagStore, evaluation, load_documents
    from tandem.rag.embedding import create_embedder

    embedder = create_embedder(args.embedder, cache_dir=args.onnx_cache_dir)
    if args.rag_command == "eval":
        docs, questions = evaluation.load_corpus(args.corpus), evaluation.load_questions(args.questions)
        with tempfile.TemporaryDirectory() as data_dir, RagStore(data_dir, embedder) as store:
            store.ingest(docs, args.collection)
            result = {"documents": len(docs), "k": args.k, "hybrid": args.hybrid,
                      **evaluation.evaluate(store, questions, args.k, args.hybrid, args.collection)}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['questions']} answerable questions over {len(docs)} documents (k={args.k}, "
                  f"{'hybrid' if args.hybrid else 'vector only'})")
            for key in ("recall@1", f"recall@{args.k}", "mrr"):
                print(f"  {key:<10} {result[key]:.3f}")
            print(f"  latency    p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
        return 0
    with RagStore(Path(args.data_dir).expanduser(), embedder) as store:
        if args.rag_command == "ingest":
            docs = [d for path in args.paths for d in load_documents(path)]
            num_docs, num_chunks = store.ingest(docs, args.collection)
            print(f"ingested {num_docs} documents ({num_chunks} chunks) into {args.collection!r}")
        elif args.rag_command == "query":
            found = store.retrieve(args.question, args.k, args.collection, args.hybrid)
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in found], indent=2))
            for rank, r in enumerate(found, 1):
                if not args.json:
                    print(f"[{rank}] {r.document_id}#{r.position} ({r.score:.3f}) {r.title}\n    {r.text[:300]}")
        else:
            print(f"rebuilt the index: {store.rebuild_index()} vectors")
    return 0


def cmd_bench(args) -> int:
    from tandem.benchmark.cli import run

    return run(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "service": cmd_service, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"model": cmd_model_info, "plugins": cmd_plugins_list, "rag": cmd_rag}.get(args.command) or COMMANDS[args.command]
    try:
        return handler(args)
    except ValueError as exc:  # every bad-input error of tandem is a ValueError
        print(f"tandem: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

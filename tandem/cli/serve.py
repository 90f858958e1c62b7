"""`tandem serve` (the pipeline on Ray) and `tandem service NAME` (one service as a plain gRPC
server). Their settings flags are generated from PipelineConfig's fields (tandem.settings): a
setting added there is a flag here, with its help, type and choices, and a tandem.yaml key.
Every default is None, so a --config file's values stand unless a flag is given.
"""
from __future__ import annotations

import argparse

from tandem import settings

# The --help sections, in this order; each setting names its own (Setting.group).
GROUPS = ("model", "engine", "speculative decoding", "pipeline", "retrieval", "gateway", "credentials",
          "migration", "ray")
SERVE_ONLY = "ray"  # the group of settings only the Ray launcher reads


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="start the pipeline on Ray (one actor per service) and the gateway",
                           description="Start local Ray (or join --ray-address) with one actor per service: "
                           "tokenizer, prefill, decode, KV-cache store, draft, retrieval, and the gateway (gRPC). "
                           "Every setting can also be set in the --config YAML file (the key is the flag's name "
                           "with underscores, or the one in [config: ...]); flags win. Ctrl-C stops everything.")
    add_pipeline_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    service = sub.add_parser("service", help="run one service as a plain gRPC server (no Ray)",
                             description="Run one service of the pipeline standalone. The gateway needs "
                             "--tokenizer and --decode (and --prefill when disaggregated); workers need "
                             "--kv-store in disaggregated mode.")
    service.add_argument("name", choices=["tokenizer", "prefill", "decode", "worker", "kvstore", "draft",
                                          "retrieval", "gateway"],
                         help="worker = prefill and decode in one process (aggregated mode)")
    service.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    peers = service.add_argument_group("peers", "where the other services listen")
    peers.add_argument("--kv-store", default=None, metavar="HOST:PORT", help="the KV-cache store's address")
    peers.add_argument("--tokenizer", default=None, metavar="HOST:PORT", help="the tokenizer service (gateway)")
    peers.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT",
                       help="a prefill worker (gateway; repeatable)")
    peers.add_argument("--decode", action="append", default=[], metavar="HOST:PORT",
                       help="a decode worker, or an aggregated one (gateway; repeatable)")
    peers.add_argument("--retrieval", default=None, metavar="HOST:PORT", help="the retrieval service (gateway: rag)")
    peers.add_argument("--draft", default=None, metavar="HOST:PORT",
                       help="the draft service (workers: speculative method remote)")
    add_pipeline_flags(service, skip_group=SERVE_ONLY)
    service.set_defaults(handler=cmd_service)


def add_pipeline_flags(p: argparse.ArgumentParser, skip_group: str | None = None) -> None:
    """--config and one flag per PipelineConfig setting (but those of skip_group)."""
    from tandem.services.config import PipelineConfig  # the settings' declarations; no service starts

    p.add_argument("--config", default=None, metavar="FILE", help="a tandem.yaml: settings under their own names")
    for title in GROUPS:
        p.add_argument_group(title)
    skip = [f.name for f, s, _ in settings.fields(PipelineConfig) if s.group == skip_group]
    settings.add_flags(p, PipelineConfig, skip=skip)


def pipeline_config(args):
    """The PipelineConfig of a command line: defaults, then --config's file, then the flags given."""
    from tandem.services.config import PipelineConfig

    return PipelineConfig.load(args.config, **settings.from_flags(args, PipelineConfig))


def cmd_serve(args) -> int:
    from tandem.orchestration.ray_launcher import serve

    return serve(pipeline_config(args), out=lambda line: print(line, flush=True))


def cmd_service(args) -> int:
    import logging
    import signal
    import threading

    from tandem.services import build
    from tandem.services.credentials import is_loopback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = pipeline_config(args)
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

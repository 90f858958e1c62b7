"""Which services a pipeline runs, on which ports, and who talks to whom. The Ray launcher and the
in-process launcher (tests, benchmarks) both start what `plan` returns, in its order (the
gateway last, once everything it calls listens)."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from tandem.services.config import PipelineConfig


@dataclass(frozen=True)
class Instance:
    service: str  # a name tandem.services.build knows: tokenizer, prefill, decode, worker, ...
    index: int    # replica number within its service
    port: int

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now. Chosen up front so a restarted actor comes back on the same
    port and its peers' channels reconnect by themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stages(instances: list[Instance]) -> list[list[Instance]]:
    """Start order: the services that call nobody, then the workers (they call the KV store and the
    draft service), then the gateway (it calls everyone)."""
    workers = {"prefill", "decode", "worker"}
    return [[i for i in instances if i.service not in workers and i.service != "gateway"],
            [i for i in instances if i.service in workers],
            [i for i in instances if i.service == "gateway"]]


def plan(config: PipelineConfig, gateway_port: int | None = None) -> list[Instance]:
    host = config.service_host
    instances = [Instance(name, 0, free_port(host)) for name in ("kvstore", "tokenizer", "draft", "retrieval")]
    if config.mode == "aggregated":
        instances += [Instance("worker", i, free_port(host)) for i in range(config.replicas["decode"])]
    else:
        for role in ("prefill", "decode"):
            instances += [Instance(role, i, free_port(host)) for i in range(config.replicas[role])]
    port = config.grpc_port if gateway_port is None else gateway_port
    return [*instances, Instance("gateway", 0, port)]


def peers(config: PipelineConfig, instances: list[Instance], advertised: dict[str, str] | None = None) -> dict:
    """The addresses each service is given (tandem.services.build's peers): what a started service
    advertised (its node's IP on a cluster), else service_host and the planned port."""
    advertised = advertised or {}

    def addresses(service: str) -> list[str]:
        return [advertised.get(i.name, f"{config.service_host}:{i.port}") for i in instances if i.service == service]

    decode = addresses("worker") if config.mode == "aggregated" else addresses("decode")
    return {"kvstore": addresses("kvstore")[0], "tokenizer": addresses("tokenizer")[0],
            "draft": addresses("draft")[0], "retrieval": addresses("retrieval")[0],
            "prefill": addresses("prefill"), "decode": decode}

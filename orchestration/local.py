"""The whole pipeline in one process, each service on its own server thread and loopback port.

The same services and wiring as `tandem serve`, without Ray: what tests and benchmarks use to
measure the gRPC path alone, and a way to run tandem where Ray is not wanted.

    with InProcessPipeline(PipelineConfig(model=..., grpc_port=0)) as pipe:
        client = tandem.sdk.Client(pipe.address)
"""
from __future__ import annotations

from tandem.services import ServiceHost, build
from tandem.services.config import PipelineConfig

from .topology import Instance, peers, plan


class InProcessPipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.instances: list[Instance] = plan(config)
        self.hosts: dict[str, ServiceHost] = {}

    def start(self) -> InProcessPipeline:
        links = peers(self.config, self.instances)
        try:
            for inst in self.instances:
                host = build(inst.service, self.config, port=inst.port, peers=links)
                self.hosts[inst.name] = host.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return self.hosts["gateway-0"].address

    @property
    def http_address(self) -> str | None:
        """host:port of the gateway's HTTP API (None when http_port is null)."""
        frontend = self.hosts["gateway-0"].http
        return frontend.address if frontend else None

    def address_of(self, name: str) -> str:
        return self.hosts[name].address

    def stop(self) -> None:
        for name in reversed(list(self.hosts)):  # the gateway first, the store last
            self.hosts.pop(name).stop()

    def __enter__(self) -> InProcessPipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

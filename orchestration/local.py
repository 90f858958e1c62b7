"""The whole pipeline in one process, each service on its own server thread and loopback port.

The same services and wiring as `tandem serve`, without Ray: what tests and benchmarks use to
measure the gRPC path alone, and a way to run tandem where Ray is not wanted. `kill` and `restart`
play the faults Ray handles under `tandem serve`: a service dies, and comes back on another port,
where its peers find it through the pipeline's `resolve` (as they ask Ray's named actors there).

    with InProcessPipeline(PipelineConfig(model=..., grpc_port=0)) as pipe:
        client = tandem.sdk.Client(pipe.address)
"""
from __future__ import annotations

from tandem.services import ServiceHost, build
from tandem.services.config import PipelineConfig

from .topology import Instance, peers, plan, stages


class InProcessPipeline:
    """Internal services listen on any free port (port 0) and their peers are given the address
    each one bound, stage by stage, as the Ray launcher does: a port planned up front could be
    taken (by another process, or as some connection's local port) before the service binds it."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.instances: list[Instance] = plan(config)
        self.hosts: dict[str, ServiceHost] = {}
        self.advertised: dict[str, str] = {}  # instance name -> the address it first bound
        self.links: dict = {}
        self.moved: dict[str, str] = {}  # first address -> where the service listens now

    def start(self) -> InProcessPipeline:
        try:
            for group in stages(self.instances):  # each once everything it calls listens
                self.links = peers(self.config, self.instances, self.advertised)
                for inst in group:
                    host = self._build(inst, inst.port if inst.service == "gateway" else 0).start()
                    self.hosts[inst.name] = host
                    self.advertised[inst.name] = host.address
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

    def resolve(self, target: str) -> str | None:
        """Where the service first given at `target` listens now (services.routing.Resolve)."""
        return self.moved.get(target, target)

    def kill(self, name: str) -> None:
        """Stop a service the way a crash does: its calls in flight end at once, no grace."""
        host = self.hosts.pop(name)
        host.options.grace_s = 0.0
        host.stop()

    def restart(self, name: str) -> str:
        """Start a killed service again, on a new port; returns its address."""
        inst = next(i for i in self.instances if i.name == name)
        host = self._build(inst, 0).start()
        self.hosts[name] = host
        self.moved[self.advertised[name]] = host.address
        return host.address

    def _build(self, inst: Instance, port: int) -> ServiceHost:
        return build(inst.service, self.config, port=port, peers=self.links, resolve=self.resolve)

    def stop(self) -> None:
        for name in reversed(list(self.hosts)):  # the gateway first, the store last
            self.hosts.pop(name).stop()

    def __enter__(self) -> InProcessPipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

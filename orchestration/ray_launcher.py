"""`tandem serve`: the pipeline on Ray, one actor per service replica, each serving gRPC.

Local Ray by default (dashboard off unless asked, a small object store: KV moves over gRPC, not
through Ray's object store); `ray_address` joins an existing cluster (KubeRay). Every actor is
restarted by Ray when its process dies, on the same port when it is free there, else on another
port or node: its peers find it again through its Ray name, `tandem-<instance>` in namespace
"tandem" (NamedActors). A stream in flight on a dead worker moves to another worker, or waits for
the restarted one (services.migration). Prefill and decode actors ask for GPUs when the cluster
has them.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from tandem.services.config import PipelineConfig

from .topology import Instance, peers, plan, stages

log = logging.getLogger(__name__)
NAMESPACE = "tandem"
READY_TIMEOUT_S = 600
STOP_MARGIN_S = 15  # past its drain grace, how long an actor's stop may take (closing servers, the engine)
RESOLVE_TIMEOUT_S = 1.0  # a restarting actor answers once it listens again; until then the caller retries
WORKERS = ("prefill", "decode", "worker")


class ServiceActor:
    """Hosts one service's gRPC server in a Ray actor process (wrapped with ray.remote at launch)."""

    def __init__(self, service: str, config: dict, port: int, links: dict, host: str,
                 directory: dict[str, str] | None = None):
        """directory: the address each peer was first given -> its instance name (for NamedActors)."""
        import torch

        from tandem.services import build

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        cfg = PipelineConfig(**config)
        if service in WORKERS:
            torch.set_num_threads(cfg.worker_threads())  # Ray sets OMP_NUM_THREADS=1
        self.service = service
        self.host = build(service, cfg, port=port, peers=links, host=host, resolve=NamedActors(directory or {}),
                          any_port_if_taken=True, exit_on_fatal=True).start()

    def address(self) -> str:
        """Where peers reach this service: a wildcard listen address (0.0.0.0 on a cluster) is
        advertised as this node's IP."""
        host, port = self.host.address.rsplit(":", 1)
        if host in ("0.0.0.0", "::", "[::]", ""):
            import ray

            host = ray.util.get_node_ip_address()
        return f"{host}:{port}"

    def http_address(self) -> str | None:
        return self.host.http.address if self.host.http else None

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.host.stop()


class NamedActors:
    """services.routing.Resolve through Ray: the address a peer was first given -> the address
    its actor reports now, wherever Ray restarted it. Called on a thread (it blocks)."""

    def __init__(self, directory: dict[str, str]):
        self.directory = directory

    def __call__(self, target: str) -> str | None:
        import ray

        name = self.directory.get(target)
        if name is None:
            return None
        actor = ray.get_actor(f"tandem-{name}", namespace=NAMESPACE)
        try:
            return ray.get(actor.address.remote(), timeout=RESOLVE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:  # still starting: not known yet
            return None


def actor_options(config: PipelineConfig, inst: Instance, gpus: bool) -> dict:
    worker = inst.service in WORKERS
    options = dict(name=f"tandem-{inst.name}", namespace=NAMESPACE, max_restarts=-1, max_task_retries=0,
                   num_cpus=1 if worker else 0, num_gpus=1 if (worker and gpus) else 0, max_concurrency=4)
    if inst.service == "gateway" and config.gateway_resources:
        options["resources"] = dict(config.gateway_resources)  # e.g. {tandem_gateway: 1}: the head pod
    return options


class RayPipeline:
    """Start with start(), stop with stop(); `address` is the gateway's."""

    def __init__(self, config: PipelineConfig):
        self.config = config.with_internal_token()  # a random token when none is configured: never open
        self.instances = plan(config)
        self.actors: dict[str, object] = {}
        self.advertised: dict[str, str] = {}  # instance name -> the address its actor reported
        self._owns_ray = False

    def start(self) -> RayPipeline:
        import ray

        c = self.config
        if not ray.is_initialized():
            kwargs = dict(namespace=NAMESPACE, include_dashboard=c.dashboard, log_to_driver=True,
                          configure_logging=False)
            if c.ray_address:
                kwargs["address"] = c.ray_address
            else:
                # Ray runs its workers at nice 15 by default: on a machine the engine keeps busy,
                # every other process (the client, the driver) then preempts the engine at each
                # token (batch-1 ITL through the pipeline 1.25-1.3x the in-process engine's at
                # nice 15, 1.1x at 0: bench/RESULTS.md). An operator's setting wins.
                os.environ.setdefault("RAY_worker_niceness", "0")
                workers = sum(1 for i in self.instances if i.service in WORKERS)
                ranks = workers * c.parallel.world_size  # a split worker's other ranks: one CPU bundle each
                kwargs["num_cpus"] = max(os.cpu_count() or 1, ranks)
                kwargs["object_store_memory"] = c.object_store_memory or min(1 << 30, _available_bytes() // 10)
            ray.init(**kwargs)
            self._owns_ray = True
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        remote = ray.remote(ServiceActor)
        try:
            for group in stages(self.instances):  # each once everything it calls listens
                links = peers(c, self.instances, self.advertised)
                directory = {address: name for name, address in self.advertised.items()}
                for inst in group:
                    host = c.host if inst.service == "gateway" else c.service_host
                    self.actors[inst.name] = remote.options(**actor_options(c, inst, gpus)).remote(
                        inst.service, c.to_dict(), inst.port, links, host, directory)
                addresses = ray.get([self.actors[i.name].address.remote() for i in group], timeout=READY_TIMEOUT_S)
                self.advertised.update({i.name: a for i, a in zip(group, addresses)})
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def http_address(self) -> str | None:
        import ray

        gateway = self.actors.get("gateway-0")
        return ray.get(gateway.http_address.remote(), timeout=30) if gateway else None

    def addresses(self) -> dict[str, str]:
        return dict(self.advertised)

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for name in reversed(list(self.actors)):  # gateway first: no new work reaches the workers
            actor = self.actors.pop(name)
            try:
                ray.get(actor.stop.remote(), timeout=self.config.drain_grace_s + STOP_MARGIN_S)
            except Exception:  # already dead, or stuck: it goes anyway
                pass
            ray.kill(actor, no_restart=True)
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def serve(config: PipelineConfig, out=print) -> int:
    """Run until Ctrl-C or SIGTERM, then stop every actor and Ray."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    pipeline = RayPipeline(config)
    out(f"tandem: starting {len(pipeline.instances)} services on Ray ({config.mode} mode, model {config.model})")
    out(f"  shape: {config.mode} ({config.mode_reason()}), {config.worker_threads()} torch threads per worker")
    p = config.parallel
    if p.world_size > 1:
        out(f"  each worker split over {p.world_size} ranks ({config.parallel_backend}): tensor "
            f"{p.tensor_parallel_size} x pipeline {p.pipeline_parallel_size}, experts over {p.expert_parallel_size}")
    pipeline.start()
    try:
        for name, address in pipeline.addresses().items():
            if name != "gateway-0":
                out(f"  {name:<12} {address}")
        keys = " (API keys required)" if config.resolved_api_keys() else ""
        tls = "TLS" if config.tls_cert else "plaintext"
        http = pipeline.http_address()
        if http:
            scheme = "https" if config.tls_cert else "http"
            out(f"tandem: OpenAI-compatible API on {scheme}://{http}/v1, metrics on {scheme}://{http}/metrics")
        origin = "configured" if config.resolved_internal_token() else "generated for this run, not shown"
        out(f"tandem: internal services require the pipeline token ({origin})"
            f"{' and mutual TLS' if config.internal_tls_cert else ''}")
        out(f"tandem: gateway listening on {pipeline.address} (gRPC, {tls}){keys}; "
            f"ready in {time.monotonic() - started:.1f} s. Ctrl-C stops.")
        while not stop.wait(0.5):
            pass
        out("tandem: stopping")
    finally:
        pipeline.stop()
    return 0


def _available_bytes() -> int:
    from tandem.engine.config import available_memory_bytes

    return available_memory_bytes()

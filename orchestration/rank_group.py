"""Where the ranks of a split model run: Ray actors in a placement group (the default), or
spawned processes on this machine ("mp": no Ray, quicker to start; tests and one-box setups).

`RankGroup.start()` starts ranks 1 .. W-1 (each runs tandem.llm.run_rank) and joins the calling
process to their gloo group as rank 0; `close()` stops them. The rendezvous:
- every rank on this node: a file in a private temporary directory (mode 0700), and gloo's
  sockets on the loopback interface (GLOO_SOCKET_IFNAME=lo unless the operator set it): nothing
  of the group listens beyond this machine;
- ranks on other nodes (a Ray cluster): rank 0's node IP and a free port. Collectives carry no
  credentials (as NCCL's and gloo's never do): keep a cluster's pod network private (the chart's
  NetworkPolicy).

Placement: one bundle of `cpus_per_rank` CPUs a rank. When the heads or experts are split (tensor
or expert parallelism: collectives in every layer) the bundles are STRICT_PACKed on rank 0's own
node (Ray's node:<ip> resource); otherwise PACK (pipeline stages exchange one activation per
micro-batch and may span nodes).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import sys
import tempfile

from tandem.errors import ConfigError
from tandem.parallel import ParallelConfig

log = logging.getLogger(__name__)
BACKENDS = ("ray", "mp")
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_rank(share, parallel: ParallelConfig, rank: int, init_method: str, timeout_s: float, env: dict) -> None:
    os.environ.update(env)
    from tandem.llm import run_rank

    run_rank(share, parallel, rank, init_method, timeout_s)


def _process_rank(*args) -> None:
    """A spawned rank's process: once its rank stopped cleanly, exit without C++ static
    destructors (gloo's threads, torn down at interpreter exit, sometimes abort the process)."""
    _run_rank(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _RankActor:
    """A rank in a Ray actor (wrapped with ray.remote at start)."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, share, parallel: ParallelConfig, rank: int, init_method: str, timeout_s: float, env: dict) -> None:
        _run_rank(share, parallel, rank, init_method, timeout_s, env)


class RankGroup:
    def __init__(self, backend: str, parallel: ParallelConfig, share, timeout_s: float, cpus_per_rank: int = 1):
        if backend not in BACKENDS:
            raise ConfigError(f"parallel_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend, self.parallel, self.share, self.timeout_s = backend, parallel, share, timeout_s
        self.cpus_per_rank = cpus_per_rank
        self._processes, self._actors, self._refs, self._pg = [], [], [], None
        self._owns_ray, self._dir, self.started = False, None, False
        atexit.register(self.close, False)

    def start(self) -> None:
        """Start the other ranks and join their group as rank 0 (blocks until every rank joined)."""
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            raise ConfigError("this process already belongs to a torch.distributed group (another parallel "
                              "tandem.LLM that is not closed?): one parallel group a process")
        world = self.parallel.world_size
        self._dir = tempfile.mkdtemp(prefix="tandem-group-")  # 0700
        local = True
        if self.backend == "ray":
            local = self._start_actors()
        init = f"file://{os.path.join(self._dir, 'rendezvous')}" if local \
            else f"tcp://{self._node_ip()}:{_free_port()}"
        env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")} if local else {}
        os.environ.update(env)
        args = [(self.share, self.parallel, rank, init, self.timeout_s, env) for rank in range(1, world)]
        if self.backend == "ray":
            self._refs = [actor.run.remote(*a) for actor, a in zip(self._actors, args)]
        else:
            import torch.multiprocessing as mp

            context = mp.get_context("spawn")
            self._processes = [context.Process(target=_process_rank, args=a, daemon=True, name=f"tandem-rank-{a[2]}")
                               for a in args]
            for process in self._processes:
                process.start()
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=self.timeout_s))
        self.started = True
        log.info("parallel group of %d ranks (%s) started: %s", world, self.backend, self.describe())

    def describe(self) -> str:
        p = self.parallel
        return (f"tensor {p.tensor_parallel_size} x pipeline {p.pipeline_parallel_size}"
                + (f", experts over {p.expert_parallel_size}" if p.expert_parallel_size > 1 else ""))

    def _start_actors(self) -> bool:
        """Ray actors for ranks 1 .. W-1 in a placement group; whether all are on this node."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = self.parallel.world_size
        if not ray.is_initialized():  # library mode: a local Ray of our own, stopped on close
            os.environ.setdefault("RAY_worker_niceness", "0")  # see orchestration/ray_launcher.py
            ray.init(num_cpus=max(os.cpu_count() or 1, world * self.cpus_per_rank), include_dashboard=False,
                     configure_logging=False, log_to_driver=True,
                     object_store_memory=78 << 20)  # steps go over gloo, not the object store
            self._owns_ray = True
        bundle = {"CPU": self.cpus_per_rank}
        strategy = "PACK"
        if self.parallel.stage_size > 1:  # split heads: every rank on rank 0's node (Ray's node:<ip> resource)
            bundle[f"node:{ray.util.get_node_ip_address()}"] = 0.001
            strategy = "STRICT_PACK"
        self._pg = placement_group([bundle] * (world - 1), strategy=strategy)
        ray.get(self._pg.ready(), timeout=self.timeout_s)
        actor = ray.remote(num_cpus=self.cpus_per_rank, max_restarts=0)(_RankActor)
        self._actors = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self._pg, placement_group_bundle_index=i)).remote() for i in range(world - 1)]
        here = ray.get_runtime_context().get_node_id()
        return all(node == here for node in ray.get([a.node.remote() for a in self._actors]))

    @staticmethod
    def _node_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()

    def alive(self) -> bool:
        """Whether every other rank still runs (a spawned process exited, or a Ray task ended)."""
        if self.backend == "mp":
            return all(p.is_alive() for p in self._processes)
        import ray

        done, _ = ray.wait(self._refs, timeout=0, num_returns=len(self._refs)) if self._refs else ([], [])
        return not done

    def close(self, graceful: bool = True) -> None:
        """stop(), and the local Ray this group started. Idempotent."""
        self.stop(graceful)
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def stop(self, graceful: bool = True) -> None:
        """Stop the ranks: graceful after rank 0 broadcast stop (they exit by themselves; wait),
        else at once. Then leave the group; start() may follow (a restart). Idempotent."""
        import torch.distributed as dist

        if self.backend == "mp":
            for process in self._processes:
                process.join(STOP_TIMEOUT_S if graceful else 0)
                if process.is_alive():
                    process.kill()
                    process.join(5)
        elif self._actors:
            import ray

            if graceful and self._refs:
                ray.wait(self._refs, timeout=STOP_TIMEOUT_S, num_returns=len(self._refs))
            for actor in self._actors:
                ray.kill(actor)
            if self._pg is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self._pg)
        self._processes, self._actors, self._refs, self._pg = [], [], [], None
        if self.started and dist.is_initialized():
            dist.destroy_process_group()
        self.started = False
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

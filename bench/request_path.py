"""The request path, measured: which hand-written files of the repository and which RPCs one
request passes through, from the SDK call to its last chunk (docs/architecture.md states the
figures; issue 16 asks for them before and after its changes).

The pipeline runs in this process (orchestration.local: every service on its own server thread,
as `tandem serve` runs them in Ray actors) with a profiler hook on every thread. After a warm-up
request, one greedy request with a fresh text prompt (no cache holds it, so a disaggregated
pipeline moves its KV through the store) is traced; an idle window of the same length is traced
too, and a file counts only where this request called a function the idle window did not (health
polls and idle engine loops are not the request's). Generated protobuf modules (tandem/v1) do not
count; an RPC is one call of a servicer method (`*Servicer.Method`), streaming or not.

    .venv/bin/python bench/request_path.py [--mode disaggregated|aggregated] [--model smollm2-135m]
        [--root DIR] [--json PATH]

--root measures another checkout of the repository (e.g. an older commit in a clone) with this
environment's packages.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
LAYERS = ("services", "plugins", "kernels", "orchestration")  # installed as tandem.<name>
PROMPT = "Shakespeare wrote for the Globe. " * 6  # about 60 tokens: whole KV blocks to move


def import_from(root: Path) -> None:
    """Import tandem and its layers from `root`, whatever the environment's editable install maps."""
    sys.path.insert(0, str(root))
    import tandem

    assert Path(tandem.__file__).resolve().parent == root / "tandem", tandem.__file__
    for layer in LAYERS:
        spec = importlib.util.spec_from_file_location(f"tandem.{layer}", root / layer / "__init__.py",
                                                      submodule_search_locations=[str(root / layer)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


class Tracer:
    """(file, function, thread id) of every call while `on`, and each servicer method call (an RPC) once."""

    def __init__(self, root: Path):
        self.root, self.on = str(root) + "/", False
        self.calls: set[tuple[str, str, int]] = set()
        self.rpcs: dict[int, tuple[str, object]] = {}  # id(frame) -> (Service.Method, the frame, kept alive)

    def __call__(self, frame, event, arg):
        if not self.on or event != "call":
            return
        path = frame.f_code.co_filename
        if (not path.startswith(self.root) or "/tandem/v1/" in path or "/bench/" in path
                or "/site-packages/" in path):  # a virtual environment inside the checkout is not tandem
            return
        name = frame.f_code.co_name
        self.calls.add((path[len(self.root):], name, threading.get_ident()))
        if name[:1].isupper() and id(frame) not in self.rpcs:
            owner = type(frame.f_locals.get("self")).__name__
            if owner.endswith("Servicer"):
                self.rpcs[id(frame)] = (f"{owner.removesuffix('Servicer')}.{name}", frame)

    def window(self, seconds: float | None = None, work=None):
        """Trace `work()` (or `seconds` of idleness): its calls, its RPCs and how long it took."""
        self.calls, self.rpcs = set(), {}
        self.on = True
        start = time.perf_counter()
        work() if work else time.sleep(seconds)
        time.sleep(0.2)  # what the services do right after the last chunk (freeing blocks, metrics)
        self.on = False
        return self.calls, [r for r, _ in self.rpcs.values()], time.perf_counter() - start


def thread_owners(pipe) -> dict[int, str]:
    """Thread id -> "service-i" (its gRPC loop) or "service-i engine" (a worker's engine thread)."""
    owners = {threading.main_thread().ident: "client"}
    for name, host in pipe.hosts.items():
        owners[host._thread.ident] = name
        for reg in host.registrations:
            worker = getattr(reg.servicer, "worker", None)
            if worker is not None:
                owners[worker.engine._thread.ident] = f"{name} engine"
    return owners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("disaggregated", "aggregated"), default="disaggregated")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--root", type=Path, default=HERE, help="the checkout to measure (default: this one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    root = args.root.resolve()
    import_from(root)
    from tandem.orchestration.local import InProcessPipeline
    from tandem.sdk import Client
    from tandem.services.config import PipelineConfig

    tracer = Tracer(root)
    threading.setprofile(tracer)
    sys.setprofile(tracer)
    import dataclasses

    # The hand-off is what a disaggregated pipeline's request path is about: a checkout that decides
    # per request (issue 16) is told to take it, since the short prompt would run whole in `auto`.
    choose = {"disaggregate": "always"} if "disaggregate" in {f.name for f in dataclasses.fields(PipelineConfig)} else {}
    config = PipelineConfig(model=args.model, mode=args.mode, grpc_port=0, http_port=None, kv_cache_memory=64 << 20,
                            **choose)
    with InProcessPipeline(config) as pipe, Client(pipe.address) as client:
        owners = thread_owners(pipe)
        ask = lambda text: client.complete(text, max_tokens=8, temperature=0)  # noqa: E731
        ask("Warm up: " + PROMPT)
        calls, rpcs, took = tracer.window(work=lambda: ask(PROMPT))
        idle, *_ = tracer.window(seconds=took)
    sys.setprofile(None)
    threading.setprofile(None)
    idle_pairs = {(path, fn) for path, fn, _ in idle}
    by_thread: dict[str, set[str]] = {}
    for path, fn, ident in calls:
        if (path, fn) not in idle_pairs:
            by_thread.setdefault(owners.get(ident, "other threads"), set()).add(path)
    files = sorted(set().union(*by_thread.values()))
    report = {"mode": args.mode, "root": str(root), "num_files": len(files), "files": files,
              "num_rpcs": len(rpcs), "rpcs": dict(Counter(rpcs)),
              "files_by_thread": {owner: sorted(paths) for owner, paths in sorted(by_thread.items())}}
    calls_by_rpc = ", ".join(f"{n}x {r}" for r, n in Counter(rpcs).items())
    print(f"{args.mode}: {len(files)} files, {len(rpcs)} RPCs ({calls_by_rpc})")
    for owner, paths in report["files_by_thread"].items():
        print(f"{owner}: {' '.join(paths)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

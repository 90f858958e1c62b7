"""CPU time each process and thread of `tandem serve`'s shape spends per streamed token: a Ray
aggregated pipeline on this machine, one batch-1 request of --tokens tokens through the SDK, the
CPU of every process's threads (psutil) before and after, divided by the tokens. Shows what the
gRPC path costs beside the engine on cores the engine fills.

    .venv/bin/python bench/pipeline_cpu.py [--tokens 400] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections
import time

import psutil

from tandem.orchestration.ray_launcher import RayPipeline
from tandem.orchestration.topology import free_port
from tandem.sdk import Client
from tandem.services.config import PipelineConfig


def cpu_by_thread() -> dict[tuple[int, int], tuple[str, str, float]]:
    """(pid, tid) -> (process, thread name, user + system seconds), for every user process."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if not proc.info["cmdline"]:
                continue  # kernel threads
            for t in proc.threads():
                try:
                    with open(f"/proc/{proc.pid}/task/{t.id}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    continue
                out[(proc.pid, t.id)] = (" ".join(proc.info["cmdline"])[:40], name, t.user_time + t.system_time)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    config = PipelineConfig(mode="aggregated", grpc_port=free_port(), http_port=None, num_threads=args.threads,
                            kv_cache_memory=256 << 20, object_store_memory=256 << 20)
    pipe = RayPipeline(config).start()
    try:
        client = Client(pipe.address)
        prompt = list(range(200, 300))

        def run(n: int) -> int:
            return sum(len(c.token_ids) for c in client.generate(prompt, temperature=0, max_tokens=n,
                                                                  ignore_eos=True))
        run(8)
        before = cpu_by_thread()
        start = time.perf_counter()
        tokens = run(args.tokens)
        wall = time.perf_counter() - start
        after = cpu_by_thread()
    finally:
        pipe.stop()
    spent = collections.Counter()
    for key, (proc, thread, seconds) in after.items():
        if key in before:
            spent[(proc, thread)] += seconds - before[key][2]
    print(f"{tokens} tokens in {wall:.2f} s: {wall / tokens * 1e3:.2f} ms a token")
    print("| process | thread | CPU per token |\n|---|---|---|")
    for (proc, thread), seconds in spent.most_common(12):
        if seconds > 0:
            print(f"| {proc} | {thread} | {seconds / tokens * 1e6:.0f} us |")


if __name__ == "__main__":
    main()

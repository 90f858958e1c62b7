"""Serving throughput against concurrency: `tandem serve` and llama.cpp's own continuous-batching
server (`llama-server`, the fair peer for many users), both over their OpenAI-compatible HTTP API,
driven by the same `tandem bench --backend openai` load (same prompts, greedy, EOS ignored), one
after the other on an otherwise idle machine, same GGUF and thread count.

    bench/peers/build_llama_cpp.sh                       # once: builds llama-server (about 10 min)
    .venv/bin/python bench/serving_peers.py [--concurrency 1 4 16 64] [--threads 2] \
        [--llama-dir build/llama.cpp] [--json bench/serving_peers.json] [--plot bench/serving_peers.png]

llama-server runs with as many slots as the highest concurrency (`-np`) and a context of that many
times (input + output + 64) tokens; tandem serve runs aggregated (one engine: the right shape for a
2-core machine), the CPU kernels and GGUF blocks by default. The plot adds the in-process figures of
bench/engine.json (tandem.LLM, llama-cpp-python, transformers) when that file is there.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TANDEM = [sys.executable, "-m", "tandem.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def drive(base_url: str, args, result: Path) -> list[dict]:
    """One `tandem bench` run over every concurrency level: its measurements."""
    levels = ",".join(map(str, args.concurrency))
    subprocess.run(TANDEM + ["bench", "--backend", "openai", "--base-url", base_url, "--dataset", "shared",
                             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                             "--num-prompts", str(max(args.concurrency) * args.rounds), "--num-warmups", "2",
                             "--max-concurrency", levels, "--ignore-eos", "--temperature", "0", "--seed", "7",
                             "--result-file", str(result), "--no-progress"], check=True, cwd=ROOT)
    return json.loads(result.read_text())["measurements"]


def row(measurements: list[dict]) -> dict:
    return {str(m["max_concurrency"]): {"output_tokens_per_s": m["output_throughput"], "failed": m["failed"],
                                        "median_ttft_ms": m["median_ttft_ms"], "median_itl_ms": m["median_itl_ms"]}
            for m in measurements}


def serve_and_drive(command: list[str], port: int, args, result: Path, env: dict | None = None) -> dict:
    """Start a server, wait for its /health on 127.0.0.1:port, drive it, stop it."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        return row(drive(f"http://127.0.0.1:{port}", args, result))
    finally:
        proc.terminate()
        proc.wait(60)


def run_llama_server(args, out: Path) -> dict:
    binary = args.llama_dir / "build" / "bin" / "llama-server"
    if not binary.exists():
        return {"skipped": f"{binary} not built (bench/peers/build_llama_cpp.sh)"}
    from tandem.model.registry import resolve_model_path

    port, slots = free_port(), max(args.concurrency)
    ctx = slots * (args.input_len + args.output_len + 64)
    command = [str(binary), "-m", str(resolve_model_path(args.model)), "-t", str(args.threads), "-tb",
               str(args.threads), "-np", str(slots), "-c", str(ctx), "-cb", "--host", "127.0.0.1", "--port", str(port),
               "--no-webui"]
    return serve_and_drive(command, port, args, out.with_name(out.stem + "_llama_server.json"))


def run_tandem_serve(args, out: Path) -> dict:
    grpc, http = free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = TANDEM + ["serve", "--mode", "aggregated", "--model", args.model, "--grpc-port", str(grpc),
                        "--http-port", str(http), "--threads", str(args.threads)]
    return serve_and_drive(command, http, args, out.with_name(out.stem + "_tandem_serve.json"), env=env)


def plot(results: dict, engine_json: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, levels in results["servers"].items():
        if "skipped" in levels:
            continue
        xs = sorted(int(c) for c in levels)
        ax.plot(xs, [levels[str(c)]["output_tokens_per_s"] for c in xs], marker="o", label=f"{name} (HTTP)")
    if engine_json.exists():
        engine = json.loads(engine_json.read_text())
        for name, r in {**engine.get("tandem", {}), **engine.get("peers", {})}.items():
            if not isinstance(r, dict):
                continue
            pts = sorted((int(k.split("@")[1]), v) for k, v in r.items() if k.startswith("aggregate_tokens_per_s@"))
            if pts:
                ax.plot(*zip(*pts), marker="x", linestyle="--", label=f"{name} (in-process)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("SmolLM2-135M Q4_1, 2 threads: throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x the highest concurrency")
    parser.add_argument("--llama-dir", type=Path, default=ROOT / "build" / "llama.cpp")
    parser.add_argument("--servers", nargs="+", default=["tandem", "llama-server"])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "serving_peers.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "serving_peers.png")
    parser.add_argument("--engine-json", type=Path, default=ROOT / "bench" / "engine.json")
    args = parser.parse_args()
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "servers": {}}
    runners = {"tandem": ("tandem serve", run_tandem_serve), "llama-server": ("llama-server", run_llama_server)}
    for key in args.servers:
        name, run = runners[key]
        results["servers"][name] = run(args, args.json)
        print(name, json.dumps(results["servers"][name], indent=1), flush=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.engine_json, args.plot)


if __name__ == "__main__":
    main()

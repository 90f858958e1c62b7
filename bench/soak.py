"""Soak: `tandem serve` under steady streaming load while its workers are killed, for a long time.

What it measures. It starts `tandem serve` (Ray, one actor per service, the default model) with
a generated pipeline token, then keeps `--streams` streams busy for `--duration` seconds: random
prompts and max_tokens, greedy and seeded-sampled, through the SDK (AsyncClient, gRPC) and the
OpenAI-compatible HTTP API (httpx, SSE), some closed by us after a random number of chunks. Every
`--kill-every` seconds it SIGKILLs one process of `--kill-roles` (pids from the workers' Stats;
other services by the port they listen on), so the gateway has to migrate the streams on it and
Ray has to restart it. Then the load stops, the pipeline settles, and it reports:
  - requests completed, cancelled by us, and failed by kind (gRPC status, HTTP code, error event);
  - text mismatches: a completed greedy or seeded request whose text differs from the first
    no-fault completion (no kill during its life) of the same (prompt, max_tokens, seed);
  - migrations (tandem_request_migrations_total on /metrics) and the kills done, with their times;
  - leaked KV blocks: the sum of kv_blocks_used over the workers once settled (and running,
    waiting, and the gateway's in-flight gauge);
  - RSS of every service process (and Ray's raylet and GCS) after `--warmup` seconds and at the
    end, and its growth for the processes that lived through (the same pid at both times).

    .venv/bin/python bench/soak.py [--mode disaggregated|aggregated] [--replicas decode=2]
        [--streams 16] [--duration 1800] [--kill-every 180] [--kill-roles decode] [--warmup 120]
        [--json bench/out/soak.json]

Pass (exit code 0): no failed request, no text mismatch, no leaked block or request, and every
service process that lived through grew its RSS by less than 5% after warm-up (Ray's own
processes are reported, not judged). serve's output is kept in bench/out/soak_serve.log.
Not part of `make test`: run it on an idle machine, 30 minutes, and put the numbers in
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import httpx

from tandem.sdk import AsyncClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _soak_load import Outcome, random_spec, run  # noqa: E402
from _soak_server import RAY_PROCESSES, Serve, role_of, rss_of  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
KV_CACHE_MEMORY = 256 << 20  # per worker, as tests/integration/test_serve.py
OBJECT_STORE_MEMORY = 100 << 20  # KV moves over gRPC, not through Ray's object store
REQUEST_TIMEOUT_S = 600
SETTLE_TIMEOUT_S = 180  # after the load: restarts finish, aborted requests free their blocks
RSS_GROWTH_LIMIT_PCT = 5.0
NUM_MISMATCH_EXAMPLES = 5


class Tally:
    """What the streams did, and the references greedy and seeded texts are checked against."""

    def __init__(self):
        self.completed = self.cancelled = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.by_api: collections.Counter[str] = collections.Counter()
        self.checked: collections.Counter[str] = collections.Counter()  # "greedy"/"seeded" -> compared
        self.mismatches: collections.Counter[str] = collections.Counter()
        self.mismatch_examples: list[dict] = []
        self.references: dict[tuple, str] = {}
        self.kills: list[dict] = []  # {"t": seconds into the run, "instance", "pid"}
        self.kill_times: list[float] = []  # time.monotonic() of each kill

    def add(self, o: Outcome) -> None:
        self.by_api[o.spec.api] += 1
        if o.error:
            self.failed[o.error] += 1
        elif o.cancelled:
            self.cancelled += 1
        else:
            self.completed += 1
            self._check(o)

    def _check(self, o: Outcome) -> None:
        kind = "greedy" if o.spec.seed is None else "seeded"
        want = self.references.get(o.spec.key)
        if want is None:
            if not any(o.start <= t <= o.end for t in self.kill_times):
                self.references[o.spec.key] = o.text
            return
        self.checked[kind] += 1
        if o.text != want:
            self.mismatches[kind] += 1
            if len(self.mismatch_examples) < NUM_MISMATCH_EXAMPLES:
                self.mismatch_examples.append({"key": list(o.spec.key), "api": o.spec.api, "want": want,
                                               "got": o.text})


# -- the load, the kills, the warm-up snapshot ---------------------------------------------------
async def stream_loop(index: int, args, deadline: float, tally: Tally, client: AsyncClient,
                      http: httpx.AsyncClient, model: str) -> None:
    rng = random.Random(args.seed * 1000 + index)
    while time.monotonic() < deadline:
        spec = random_spec(rng, args.http_share, args.seeded_share, args.cancel_share)
        tally.add(await run(spec, client, http, model))


async def kill_loop(serve: Serve, args, start: float, deadline: float, tally: Tally) -> None:
    rng = random.Random(f"kills-{args.seed}")  # not the same draws as stream 0's
    roles = set(args.kill_roles)
    while time.monotonic() + args.kill_every < deadline:
        await asyncio.sleep(args.kill_every)
        candidates = [n for n in [*serve.addresses, "gateway-0"] if role_of(n) in roles]
        name = rng.choice(candidates)
        pid = await asyncio.to_thread(serve.pid_of, name)
        if pid is None:  # still restarting from an earlier kill: try again next time
            print(f"[{time.monotonic() - start:7.1f}s] kill: {name} has no pid now; skipped", flush=True)
            continue
        os.kill(pid, signal.SIGKILL)
        tally.kill_times.append(time.monotonic())
        tally.kills.append({"t": round(time.monotonic() - start, 1), "instance": name, "pid": pid})
        print(f"[{time.monotonic() - start:7.1f}s] SIGKILL {name} (pid {pid}); {progress(tally)}", flush=True)


async def snapshot_after(serve: Serve, seconds: float) -> dict[str, dict]:
    await asyncio.sleep(seconds)
    rss = await asyncio.to_thread(lambda: rss_of(serve.processes()))
    print(f"[{seconds:7.1f}s] warm-up over: RSS of {len(rss)} processes noted", flush=True)
    return rss


def progress(tally: Tally) -> str:
    return (f"completed {tally.completed}, cancelled {tally.cancelled}, failed {sum(tally.failed.values())}, "
            f"mismatches {sum(tally.mismatches.values())}")


async def drive(serve: Serve, args) -> tuple[Tally, dict[str, dict], float]:
    """Run the load; returns the tally, the warm-up RSS and the seconds the load ran."""
    tally, start = Tally(), time.monotonic()
    deadline = start + args.duration
    async with AsyncClient(serve.gateway, timeout=REQUEST_TIMEOUT_S, max_retries=0) as client, \
            httpx.AsyncClient(base_url=serve.http_base, timeout=REQUEST_TIMEOUT_S) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        warm = asyncio.create_task(snapshot_after(serve, args.warmup))
        killer = asyncio.create_task(kill_loop(serve, args, start, deadline, tally))
        await asyncio.gather(*(stream_loop(i, args, deadline, tally, client, http, model)
                               for i in range(args.streams)))
        await killer
        return tally, await warm, time.monotonic() - start


# -- after the load ------------------------------------------------------------------------------
def settle(serve: Serve) -> dict:
    """Wait until every worker answers and holds nothing, and the gateway serves nothing; returns
    what is left then (or at SETTLE_TIMEOUT_S)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        left = leftovers(serve)
        if time.monotonic() > deadline or (left["all_answered"] and left["gateway_inflight"] == 0 and not any(
                left[k] for k in ("kv_blocks_used", "running", "waiting"))):
            return left
        time.sleep(2)


def leftovers(serve: Serve) -> dict:
    workers = {name: serve.stats(name) for name in serve.workers()}
    metrics = serve.metrics()
    total = lambda key: int(sum(v.get(key, 0) for v in workers.values() if v))  # noqa: E731
    return {"kv_blocks_used": total("kv_blocks_used"), "running": total("running"), "waiting": total("waiting"),
            "gateway_inflight": None if metrics is None else int(metrics.get("tandem_gateway_requests_inflight", 0)),
            "all_answered": all(workers.values()),
            "per_worker": {n: {k: v[k] for k in ("kv_blocks_used", "running", "waiting", "pid")} if v else None
                           for n, v in workers.items()}}


def rss_growth(warm: dict[str, dict], end: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name, w in warm.items():
        e = end.get(name)
        lived = e is not None and e["pid"] == w["pid"]
        rows[name] = {"pid": w["pid"], "warm_mb": round(w["rss_mb"], 1),
                      "end_mb": round(e["rss_mb"], 1) if e else None, "lived_through": lived,
                      "growth_pct": round(100 * (e["rss_mb"] / w["rss_mb"] - 1), 2) if lived else None,
                      "judged": lived and name.split(":")[-1] not in RAY_PROCESSES}
    return rows


def verdict(report: dict) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = []
    if report["requests"]["failed_total"]:
        reasons.append(f"{report['requests']['failed_total']} failed requests")
    if sum(report["checks"]["mismatches"].values()):
        reasons.append(f"text mismatches {report['checks']['mismatches']}")
    left = report["leftovers"]
    if left["kv_blocks_used"] or left["running"] or left["waiting"] or left["gateway_inflight"] != 0:
        reasons.append(f"leaked: {left['kv_blocks_used']} blocks, {left['running']} running, "
                       f"{left['waiting']} waiting, {left['gateway_inflight']} in flight at the gateway")
    if not left["all_answered"]:
        reasons.append("a worker did not answer Stats after settling")
    grown = [f"{n} +{r['growth_pct']}%" for n, r in report["rss"].items()
             if r["judged"] and r["growth_pct"] >= RSS_GROWTH_LIMIT_PCT]
    if grown:
        reasons.append("RSS growth: " + ", ".join(grown))
    return reasons


def build_report(args, tally: Tally, seconds: float, left: dict, warm: dict, end: dict, migrations: float) -> dict:
    report = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "load_s": round(seconds, 1),
              "requests": {"completed": tally.completed, "cancelled_by_us": tally.cancelled,
                           "failed": dict(tally.failed), "failed_total": sum(tally.failed.values()),
                           "by_api": dict(tally.by_api)},
              "checks": {"checked": dict(tally.checked), "mismatches": dict(tally.mismatches),
                         "references": len(tally.references), "mismatch_examples": tally.mismatch_examples},
              "migrations": migrations, "kills": tally.kills, "leftovers": left, "rss": rss_growth(warm, end)}
    report["failures"] = verdict(report)
    report["pass"] = not report["failures"]
    return report


def print_summary(report: dict) -> None:
    r, c, left = report["requests"], report["checks"], report["leftovers"]
    print(f"\nsoak: {report['load_s']} s of load, {report['args']['streams']} streams ({report['args']['mode']})")
    print(f"  requests   completed {r['completed']}, cancelled by us {r['cancelled_by_us']}, "
          f"failed {r['failed_total']} {r['failed'] or ''}  (by api {r['by_api']})")
    print(f"  text       checked {c['checked']}, mismatches {c['mismatches']}")
    print(f"  faults     kills {len(report['kills'])}, migrations {report['migrations']:g}")
    print(f"  leftovers  blocks {left['kv_blocks_used']}, running {left['running']}, waiting {left['waiting']}, "
          f"gateway in flight {left['gateway_inflight']}, every worker answered: {left['all_answered']}")
    for name, row in report["rss"].items():
        growth = f"{row['growth_pct']:+.2f}%" if row["lived_through"] else "restarted"
        print(f"  rss        {name:<16} {row['warm_mb']:8.1f} -> {row['end_mb'] or 0:8.1f} MB  {growth}"
              f"{'' if row['judged'] or not row['lived_through'] else '  (not judged)'}")
    print("PASS" if report["pass"] else "FAIL: " + "; ".join(report["failures"]))


def serve_args(args) -> list[str]:
    out = ["--mode", args.mode, "--kv-cache-memory", str(args.kv_cache_memory),
           "--object-store-memory", str(args.object_store_memory)]
    for replicas in args.replicas:
        out += ["--replicas", replicas]
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("disaggregated", "aggregated"), default="disaggregated")
    ap.add_argument("--replicas", action="append", default=None, metavar="ROLE=N", help="default: decode=2")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=120, help="seconds before the RSS baseline")
    ap.add_argument("--kill-every", type=float, default=180, help="seconds between kills (0: none)")
    ap.add_argument("--kill-roles", default=None, help="comma-separated: decode, prefill, worker, kvstore, "
                    "tokenizer, draft, retrieval, gateway (default: decode; worker when aggregated)")
    ap.add_argument("--http-share", type=float, default=0.3, help="fraction of requests over HTTP")
    ap.add_argument("--seeded-share", type=float, default=0.3, help="fraction sampled with a seed (else greedy)")
    ap.add_argument("--cancel-share", type=float, default=0.15, help="fraction we close early")
    ap.add_argument("--kv-cache-memory", type=int, default=KV_CACHE_MEMORY)
    ap.add_argument("--object-store-memory", type=int, default=OBJECT_STORE_MEMORY)
    ap.add_argument("--seed", type=int, default=0, help="seeds the choice of requests and kills")
    ap.add_argument("--json", type=Path, default=OUT / "soak.json")
    args = ap.parse_args()
    args.replicas = args.replicas or ["decode=2"]
    args.kill_roles = (args.kill_roles or ("worker" if args.mode == "aggregated" else "decode")).split(",")
    if not 0 < args.warmup < args.duration:
        ap.error("--warmup must be positive and shorter than --duration")
    if args.kill_every <= 0:
        args.kill_every = float("inf")
    return args


def main() -> int:
    args = parse_args()
    serve = Serve(serve_args(args), OUT / "soak_serve.log")
    try:
        serve.wait_ready()
        print(f"tandem serve up: {', '.join(serve.addresses)}, gateway {serve.gateway}", flush=True)
        tally, warm, seconds = asyncio.run(drive(serve, args))
        print(f"load over ({progress(tally)}); settling", flush=True)
        left = settle(serve)
        end = rss_of(serve.processes())
        migrations = (serve.metrics() or {}).get("tandem_request_migrations_total", 0.0)
    finally:
        code = serve.stop()
    report = build_report(args, tally, seconds, left, warm, end, migrations)
    report["serve_exit_code"] = code
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The `tandem serve` subprocess that bench/soak.py drives, and what the soak asks of it: every
service's Stats rpc (with the pipeline token, generated here and given to serve through
TANDEM_INTERNAL_TOKEN), the pid and RSS of each service's process, and the gateway's /metrics.

Workers report their pid in Stats; the other services do not, so their process is the one among
serve's descendants (Ray's raylet starts every actor) that listens on the service's port.
"""
from __future__ import annotations

import collections
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil

from tandem.orchestration.topology import free_port
from tandem.v1 import (common_pb2, decode_pb2_grpc, draft_pb2_grpc, kvstore_pb2_grpc, prefill_pb2_grpc,
                       retrieval_pb2_grpc, tokenizer_pb2_grpc)

START_TIMEOUT_S = 600  # the first start on a 2-core machine loads the model in every worker
STOP_TIMEOUT_S = 90
STATS_TIMEOUT_S = 10
LOG_TAIL_LINES = 60  # of serve's output, shown when it fails to start
STUBS = {"decode": decode_pb2_grpc.DecodeStub, "worker": decode_pb2_grpc.DecodeStub,
         "prefill": prefill_pb2_grpc.PrefillStub, "kvstore": kvstore_pb2_grpc.KVStoreStub,
         "tokenizer": tokenizer_pb2_grpc.TokenizerStub, "draft": draft_pb2_grpc.DraftStub,
         "retrieval": retrieval_pb2_grpc.RetrievalStub}
WORKER_ROLES = ("prefill", "decode", "worker")
RAY_PROCESSES = ("raylet", "gcs_server")  # reported, not gated: Ray's own bookkeeping grows with tasks
_ADDRESS_LINE = re.compile(r"\s+([a-z]+-\d+)\s+(\S+:\d+)$")


def role_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


class Serve:
    """`tandem serve` in a subprocess; its output goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path):
        self.token = secrets.token_urlsafe(32)
        self.port, self.http_port = free_port(), free_port()
        self.addresses: dict[str, str] = {}  # instance name -> host:port, from serve's output
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.ready = threading.Event()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("w")
        env = {**os.environ, "RAY_DEDUP_LOGS": "0", "TANDEM_INTERNAL_TOKEN": self.token}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--grpc-port", str(self.port),
             "--http-port", str(self.http_port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.tail.append(line.rstrip())
            match = _ADDRESS_LINE.match(line.rstrip())
            if match and not self.ready.is_set():
                self.addresses[match.group(1)] = match.group(2)
            if "gateway listening" in line:
                self.ready.set()
        self.log.flush()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.wait(1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("tandem serve did not start:\n" + "\n".join(self.tail))

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def workers(self) -> list[str]:
        return [name for name in self.addresses if role_of(name) in WORKER_ROLES]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self.log.flush()
        return code

    # -- asking the services ---------------------------------------------------------------------
    def stats(self, name: str) -> dict[str, float] | None:
        """The instance's Stats values; None when it does not answer (dead, restarting)."""
        metadata = [("authorization", f"Bearer {self.token}")]
        try:
            with grpc.insecure_channel(self.addresses[name]) as channel:
                reply = STUBS[role_of(name)](channel).Stats(common_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S,
                                                            metadata=metadata)
        except grpc.RpcError:
            return None
        return dict(reply.values)

    def pid_of(self, name: str) -> int | None:
        """The pid serving instance `name` ("gateway-0" too): from Stats, else by listening port."""
        if role_of(name) in WORKER_ROLES:
            values = self.stats(name)
            return int(values["pid"]) if values and "pid" in values else None
        port = self.port if name == "gateway-0" else int(self.addresses[name].rsplit(":", 1)[1])
        return next((p.pid for p in self._descendants() if port in _listening_ports(p)), None)

    def metrics(self) -> dict[str, float] | None:
        """/metrics as {name: sum over its label sets}; None when the gateway does not answer."""
        try:
            text = httpx.get(f"{self.http_base}/metrics", timeout=30).raise_for_status().text
        except httpx.HTTPError:
            return None
        sums: dict[str, float] = collections.defaultdict(float)
        for match in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? (\S+)$", text, re.M):
            sums[match.group(1)] += float(match.group(2))
        return sums

    # -- processes -------------------------------------------------------------------------------
    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> dict[str, int]:
        """name -> pid of every service instance, the gateway, and Ray's raylet and GCS."""
        pids = {name: self.pid_of(name) for name in [*self.addresses, "gateway-0"]}
        for p in self._descendants():
            name = _safe(p.name)
            if name in RAY_PROCESSES:
                pids[f"ray:{name}"] = p.pid
        return {name: pid for name, pid in pids.items() if pid}


def rss_of(pids: dict[str, int]) -> dict[str, dict]:
    """name -> {"pid", "rss_mb"} of the processes still alive."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = {"pid": pid, "rss_mb": psutil.Process(pid).memory_info().rss / 2**20}
        except psutil.NoSuchProcess:
            pass
    return out


def _listening_ports(p: psutil.Process) -> set[int]:
    try:
        return {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def _safe(getter) -> str:
    try:
        return getter()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""

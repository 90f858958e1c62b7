"""`tandem bench` end to end, through tandem's own command line: against the whole pipeline
in-process on the tiny model (its gRPC API, and its OpenAI HTTP API), against a small
OpenAI-compatible HTTP server (a test double of the protocol: streamed completions as server-sent
events, cut at awkward places, with failures mixed in), and against nothing at all."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tandem.cli import main
from tandem.orchestration.local import InProcessPipeline
from tests.unit.services.test_pipeline import config as pipeline_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 200


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    """The whole pipeline on the tiny model: the gateway's gRPC API and its OpenAI HTTP API (port 0)."""
    with InProcessPipeline(pipeline_config(tiny_hf_dir)) as p:
        yield p


def test_bench_against_the_tandem_pipeline(pipe, tmp_path, capsys):
    result_file = tmp_path / "out" / "tandem.json"
    rc = main(["bench", "--target", pipe.address, "--num-prompts", "6", "--num-warmups", "2", "--input-len", "24",
               "--output-len", "8", "--request-rate", "inf,50", "--max-concurrency", "4", "--goodput", "ttft:60000",
               "--percentiles", "50,99", "--result-file", str(result_file), "--save-requests", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("============ Serving Benchmark Result ============") == 2
    assert "Mean TTFT (ms):" in out and "P99 ITL (ms):" in out and "rate 50, concurrency 4" in out
    result = json.loads(result_file.read_text())
    assert result["backend"] == "tandem" and result["model"] and result["config"]["request_rates"] == ["inf", 50.0]
    assert [m["label"] for m in result["measurements"]] == ["rate inf, concurrency 4", "rate 50, concurrency 4"]
    for m in result["measurements"]:
        assert (m["completed"], m["failed"], m["errors"]) == (6, 0, {})
        # prompts cut to exactly 24 tokens by the server's tokenizer; EOS ignored: exactly 8 tokens out
        assert m["total_input_tokens"] == 6 * 24 and m["total_output_tokens"] == 6 * 8
        assert m["request_goodput"] == pytest.approx(m["request_throughput"])  # a 60 s TTFT SLO: all meet it
        assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] <= m["p99_e2el_ms"] and m["mean_tpot_ms"] > 0
        assert len(m["requests"]) == 6
        assert all(r["success"] and r["output_tokens"] == 8 and sum(r["chunk_tokens"]) == 8 for r in m["requests"])
    check_png(tmp_path / "out" / "tandem.png")


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_bench_openai_against_the_tandem_http_gateway(pipe, tiny_hf_dir, backend, tmp_path, capsys):
    result_file = tmp_path / "http.json"
    rc = main(["bench", "--backend", backend, "--base-url", f"http://{pipe.http_address}", "--num-prompts", "4",
               "--input-len", "12", "--output-len", "6", "--ignore-eos", "--max-concurrency", "2",
               "--result-file", str(result_file), "--save-requests", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(result_file.read_text())
    [m] = result["measurements"]
    assert result["model"] == tiny_hf_dir.name  # the first of GET /v1/models
    assert (m["completed"], m["failed"]) == (4, 0)
    assert m["total_output_tokens"] == 4 * 6  # the usage chunk's counts: EOS ignored, exactly 6 tokens
    assert all(r["prompt_len"] >= 12 for r in m["requests"])  # the server's prompt tokens, not the estimate
    assert 0 < m["median_ttft_ms"] <= m["median_e2el_ms"] and m["mean_tpot_ms"] > 0
    check_png(tmp_path / "http.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_is_a_clear_error(tmp_path, capsys):
    port = free_port()
    for flags in (["--target", f"127.0.0.1:{port}"], ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}"]):
        rc = main(["bench", *flags, "--num-prompts", "2", "--result-file", str(tmp_path / "r.json"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("tandem: error: ") and "Traceback" not in err
        assert str(port) in err
    assert not (tmp_path / "r.json").exists()


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible server in miniature: GET /v1/models; POST /v1/completions and
    /v1/chat/completions streaming two-word deltas as chunked SSE cut mid-line, a usage-only last
    chunk and [DONE]. The 3rd request answers HTTP 503, the 5th fails mid-stream with an error event."""

    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    bodies: list[dict] = []
    headers_seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/v1/models":
            return self.send_error(404)
        self.reply(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            self.headers_seen.append(dict(self.headers))
            number = len(self.bodies)
        if number == 3:
            return self.reply(503, {"error": {"message": "overloaded", "type": "server_error"}})
        chat = self.path == "/v1/chat/completions"
        events = [self.delta(chat, f" tok{i}") for i in range(body["max_tokens"])]
        if number == 5:
            events = events[:2] + [{"error": {"message": "the engine died", "type": "internal_error"}}]
        else:
            events.append({"choices": [{"index": 0, "finish_reason": "length", **self.delta(chat, "")["choices"][0]}]})
            events.append({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": body["max_tokens"]}})
        stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(stream), 23):  # pieces that end inside lines and inside "data:"
            piece = stream[i:i + 23]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def delta(chat: bool, text: str) -> dict:
        return {"choices": [{"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}]}

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def openai_server():
    FakeOpenAI.bodies, FakeOpenAI.headers_seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_bench_against_an_openai_compatible_server(openai_server, backend, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    result_file = tmp_path / "openai.json"
    rc = main(["bench", "--backend", backend, "--base-url", openai_server + "/", "--num-prompts", "8",
               "--input-len", "16", "--output-len", "5", "--max-concurrency", "3", "--ignore-eos",
               "--result-file", str(result_file), "--plot", str(tmp_path / "plot.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "Errors" in out and "HTTP 503:" in out
    [m] = json.loads(result_file.read_text())["measurements"]
    assert (m["completed"], m["failed"]) == (6, 2)
    assert m["errors"] == {"HTTP 503": 1, "internal_error": 1}
    assert m["error_examples"] == {"HTTP 503": "overloaded", "internal_error": "the engine died"}
    assert m["total_output_tokens"] == 6 * 5 and m["total_input_tokens"] == 6 * 11  # from the usage chunks
    assert m["mean_tokens_per_chunk"] == pytest.approx(1.0) and m["p99_itl_ms"] is not None
    assert "requests" not in m
    check_png(tmp_path / "plot.png")
    body = FakeOpenAI.bodies[0]
    assert body["model"] == "fake-model" and body["stream"] is True and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["temperature"] == 0
    assert ("messages" in body) == (backend == "openai-chat") and ("prompt" in body) == (backend == "openai")
    text = body["messages"][0]["content"] if backend == "openai-chat" else body["prompt"]
    assert len(text.split()) == 16
    assert all(h["Authorization"] == "Bearer sk-test" for h in FakeOpenAI.headers_seen)


def test_openai_without_ignore_eos_does_not_send_it(openai_server, tmp_path, capsys):
    rc = main(["bench", "--backend", "openai", "--base-url", openai_server, "--model", "mine", "--num-prompts", "2",
               "--output-len", "3", "--api-key", "k1", "--result-file", str(tmp_path / "r.json"), "--no-progress"])
    capsys.readouterr()
    assert rc == 0
    assert all("ignore_eos" not in b and b["model"] == "mine" for b in FakeOpenAI.bodies)
    assert FakeOpenAI.headers_seen[0]["Authorization"] == "Bearer k1"

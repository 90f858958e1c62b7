"""The `tandem` command as a user runs it: a subprocess, output on stdout, errors as one line
on stderr with exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tandem.cli import main


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate():
    result = run("generate", "The capital of France is", "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris.")


def test_chat_reads_stdin_until_eof():
    # Dequantized, the model answers "Paris" greedily; with the file's Q4_1 blocks multiplied as
    # llama.cpp does (the default) it answers as llama.cpp does: "L'Étoile, la Cité, ..."
    result = run("chat", "--max-tokens", "24", "--quantization", "none", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_model_info():
    result = run("model", "info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Q4_1 x210" in out and "layers" in out and "30" in out
    # KV per token: 2 * 30 layers * 3 kv heads * 64 * 4 bytes
    assert "46080" in out


@pytest.mark.parametrize("args,message", [
    (["generate", "", "--max-tokens", "2"], "prompt is empty"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "hi", "--top-k", "-2"], "top_k"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hi", "--max-tokens", "999999999999"], "max_tokens"),
    (["generate", "hi", "--model", "no-such-model"], "unknown model"),
    (["model", "info", "/nonexistent/model.gguf"], "unknown model"),
])
def test_bad_input_is_one_line_and_status_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tandem: error:") and message in err


def test_prompt_longer_than_context(capsys):
    assert main(["generate", "word " * 9000, "--max-tokens", "2"]) == 2
    assert "context window" in capsys.readouterr().err


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    assert main(["generate", "hi", "--model", str(bad)]) == 2
    assert "GGUF" in capsys.readouterr().err

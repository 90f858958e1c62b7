"""Devices: names are checked before anything loads, and attention metadata built on the host
moves whole to the model's device (checked with PyTorch's "meta" device, which every machine has)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import tandem
from tandem.engine.config import resolve_device
from tandem.engine.paged_attention import build_metadata
from tandem.errors import ConfigError
from tandem.model.attention import DEFAULT_VARIANT, tensors_to
from tandem.plugins.attention import ALiBi, SlidingWindow


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_bad_device_fails_before_the_model_loads(tiny_hf_dir, monkeypatch):
    import tandem.llm

    monkeypatch.setattr(tandem.llm, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="device"):
        tandem.LLM(str(tiny_hf_dir), device="gpu0", progress=False)


def tensors(x) -> list[torch.Tensor]:
    """Every tensor inside nested frozen dataclasses and tuples."""
    if isinstance(x, torch.Tensor):
        return [x]
    if dataclasses.is_dataclass(x):
        return [t for f in dataclasses.fields(x) for t in tensors(getattr(x, f.name))]
    if isinstance(x, tuple):
        return [t for v in x for t in tensors(v)]
    return []


@pytest.mark.parametrize("variant", [DEFAULT_VARIANT, SlidingWindow(window=6), ALiBi()], ids=["causal", "window", "alibi"])
def test_metadata_moves_to_the_device_whole(variant):
    # a fresh prompt, a chunk with context, and two decodes in non-consecutive blocks
    rows = [([0, 1, 2], 0, 9), ([3, 4, 5, 11], 8, 5), ([6, 7], 7, 1), ([9, 8, 10], 10, 1)]
    meta = build_metadata(rows, 4, variant, num_heads=4)
    assert meta.to(torch.device("cpu")) is meta  # the host: nothing to do
    moved = meta.to(torch.device("meta"))
    before, after = tensors(meta), tensors(moved)
    assert len(after) == len(before) >= 6
    assert all(t.device.type == "meta" for t in after)
    assert [(t.shape, t.dtype) for t in after] == [(t.shape, t.dtype) for t in before]
    assert moved.decodes.contiguous == meta.decodes.contiguous
    assert tensors_to(3, torch.device("meta")) == 3


def test_an_explicit_cpu_device_changes_nothing(tiny_hf_dir, tiny_llm):
    llm = tandem.LLM(str(tiny_hf_dir), device="cpu", progress=False, num_kv_blocks=64)
    params = tandem.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate("hello world", params)[0].token_ids == tiny_llm.generate("hello world", params)[0].token_ids
    assert llm.device == torch.device("cpu") and llm.engine.runner.k_pools[0].data.device.type == "cpu"

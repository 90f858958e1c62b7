"""Model loading: GGUF tensor types, metadata -> config, HF directories, and every way a file can be bad."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tandem
from tandem.errors import ModelLoadError
from tandem.model.gguf_file import GGUFFile
from tandem.model.registry import resolve_model_path
from tests.tiny_models import TINY_CONFIG, write_tiny_gguf, write_tiny_hf_dir

QUANT_TOLERANCE = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.2, "Q4_1": 0.2}  # max |w - w_q| / max|w|


def test_gguf_metadata_becomes_config(tiny_gguf):
    c = GGUFFile(tiny_gguf).config()
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 2, 64, 128)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position) == (4, 2, 16, 512)
    assert c.vocab_size == TINY_CONFIG["vocab_size"] and not c.tie_word_embeddings
    assert c.rope_theta == 10000.0 and c.rms_norm_eps == pytest.approx(1e-5)


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE))
def test_quantized_gguf_types_load(tiny_hf_dir, tiny_llm, tmp_path, qtype):
    """Weights stored as qtype dequantize to the original within the format's precision, and Q/K
    un-permutation still lines up (a wrong permutation would move whole rows, far past tolerance)."""
    import gguf

    path = write_tiny_gguf(tiny_hf_dir, tmp_path / f"{qtype}.gguf", qtype)
    assert GGUFFile(path).tensor_types()[qtype] > 0
    llm = tandem.LLM(str(path), progress=False, quantization="none")  # dequantized (blocks: test_ggml_cpu.py)
    assert gguf.GGMLQuantizationType[qtype]  # the name is a real GGML type
    for name, ref in tiny_llm.model.state_dict().items():
        got = llm.model.state_dict()[name]
        err = (got - ref).abs().max() / ref.abs().max()
        assert err <= QUANT_TOLERANCE[qtype], (name, float(err))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_tensors_dequantize(tmp_path, qtype):
    """K-quant blocks (256 values) read through GGUFFile equal the gguf package's dequantization."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in ((0, 2) if qtype == "Q4_K" else (208,)):  # the fp16 super-block scales
        raw[:, offset:offset + 2] = scale
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("token_embd.weight", raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = GGUFFile(tmp_path / "k.gguf").load_tensor("token_embd.weight")
    assert got.shape == (4, block) and got.dtype == torch.float32
    expected = gguf.quants.dequantize(raw, qt)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0


def test_truncated_gguf_is_rejected(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="GGUF|truncated"):
            tandem.LLM(str(bad), progress=False)


def test_garbage_file_is_rejected(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        tandem.LLM(str(bad), progress=False)


def test_unknown_model_name_lists_choices():
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        resolve_model_path("no-such-model")
    with pytest.raises(ValueError):
        tandem.LLM("no-such-model")


def test_hf_dir_problems(tiny_hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        tandem.LLM(str(broken), progress=False)

    other_arch = tmp_path / "other"
    shutil.copytree(tiny_hf_dir, other_arch)
    cfg = json.loads((other_arch / "config.json").read_text())
    (other_arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        tandem.LLM(str(other_arch), progress=False)


def test_missing_and_misshapen_tensors(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_hf_dir / "model.safetensors"))
    for label, change in [("missing", lambda w: w.pop("model.norm.weight")),
                          ("shape", lambda w: w.update({"model.norm.weight": torch.ones(3)}))]:
        d = tmp_path / label
        shutil.copytree(tiny_hf_dir, d)
        edited = dict(weights)
        change(edited)
        save_file(edited, str(d / "model.safetensors"))
        with pytest.raises(ModelLoadError, match="missing|shape"):
            tandem.LLM(str(d), progress=False)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 128,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0},
])
def test_hf_rope_scaling_end_to_end(tmp_path, scaling):
    from transformers import LlamaForCausalLM

    d = write_tiny_hf_dir(tmp_path, TINY_CONFIG, rope_scaling=scaling)
    llm = tandem.LLM(str(d), progress=False)
    assert llm.config.rope_scaling.kind == scaling["rope_type"]
    ref = LlamaForCausalLM.from_pretrained(str(d)).eval()
    ids = torch.randint(0, llm.config.vocab_size, (1, 300))  # past the original context
    with torch.inference_mode():
        ours = llm.model.compute_logits(llm.model(ids, torch.arange(300).unsqueeze(0)))
        torch.testing.assert_close(ours, ref(ids).logits, atol=2e-4, rtol=2e-4)

"""The tiny Llama against transformers' own implementation (an exact torch forward), and the
KV-cache paths against full recomputation."""
from __future__ import annotations

import pytest
import torch

from tandem.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def hf_reference(tiny_hf_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_hf_dir)).eval()


def _logits(llm, ids: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
    logits = llm.model.compute_logits(llm.model(ids, positions, cache))
    if cache is not None:
        cache.advance(ids.shape[1])
    return logits


@torch.inference_mode()
def test_forward_shapes(tiny_llm):
    ids = torch.randint(0, tiny_llm.config.vocab_size, (3, 11))
    hidden = tiny_llm.model(ids, torch.arange(11).expand(3, -1))
    assert hidden.shape == (3, 11, tiny_llm.config.hidden_size)
    assert _logits(tiny_llm, ids).shape == (3, 11, tiny_llm.config.vocab_size)


@torch.inference_mode()
def test_matches_transformers(tiny_llm, hf_reference):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_llm.config.vocab_size, (2, 37))
    expected = hf_reference(ids).logits
    torch.testing.assert_close(_logits(tiny_llm, ids), expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_gguf_conversion_matches_transformers(tiny_gguf, hf_reference):
    """Q/K rows permuted by the converter are un-permuted on load: same logits as the HF model."""
    import tandem

    llm = tandem.LLM(str(tiny_gguf), progress=False)
    ids = torch.randint(0, llm.config.vocab_size, (1, 29))
    torch.testing.assert_close(_logits(llm, ids), hf_reference(ids).logits, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("chunks", [[20], [1] * 20, [7, 1, 12], [13, 7]])
def test_kv_cache_decode_equals_full_recompute(tiny_llm, chunks):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_llm.config.vocab_size, (1, sum(chunks)))
    full = _logits(tiny_llm, ids)
    cache = KVCache(tiny_llm.config, ids.shape[1])
    pieces, start = [], 0
    for size in chunks:
        pieces.append(_logits(tiny_llm, ids[:, start:start + size], cache, start))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == ids.shape[1]


def test_kv_cache_overflow_is_an_error(tiny_llm):
    cache = KVCache(tiny_llm.config, 4)
    with pytest.raises(ValueError, match="overflow"):
        _logits(tiny_llm, torch.zeros(1, 5, dtype=torch.long), cache)


@torch.inference_mode()
def test_bfloat16_close_to_float32(tiny_hf_dir, tiny_llm):
    import tandem

    llm16 = tandem.LLM(str(tiny_hf_dir), dtype="bfloat16", progress=False)
    assert next(llm16.model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, llm16.config.vocab_size, (1, 24))
    ref = _logits(tiny_llm, ids)
    got = _logits(llm16, ids)
    assert got.dtype == torch.float32  # logits are always handed to the sampler in fp32
    # bf16 has 8 mantissa bits: agreement is statistical, not exact.
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_gqa_mqa_mha_match_transformers(tmp_path):
    """Head layouts other than the fixture's: MHA (kv == heads) and MQA (kv == 1)."""
    import tandem
    from transformers import LlamaForCausalLM

    from tests.tiny_models import TINY_CONFIG, write_tiny_hf_dir

    for kv_heads in (4, 1):
        d = tmp_path / f"kv{kv_heads}"
        d.mkdir()
        write_tiny_hf_dir(d, {**TINY_CONFIG, "num_key_value_heads": kv_heads, "tie_word_embeddings": True})
        llm = tandem.LLM(str(d), progress=False)
        ref = LlamaForCausalLM.from_pretrained(str(d)).eval()
        ids = torch.randint(0, llm.config.vocab_size, (1, 17))
        with torch.inference_mode():
            torch.testing.assert_close(_logits(llm, ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
        assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight

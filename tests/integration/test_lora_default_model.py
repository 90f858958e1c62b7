"""LoRA adapters on the real default model (issue 19's check): two adapters made with PEFT on
SmolLM2-135M (rank 8, alpha 16, all seven projections, seeded random non-zero A and B) give in
tandem (quantization="none": the GGUF dequantized to fp32, the weights transformers' GGUF loader
makes) the logits and greedy tokens transformers + PEFT give on the same weights, and one batch
mixing both adapters and the bare base gives each row what it gets alone.

The references are computed once (one left-padded greedy batch per adapter), then transformers'
model is freed. The file takes about 40 s of CPU time, most of it loading the two models."""
from __future__ import annotations

import gc
from contextlib import contextmanager

import pytest
import torch

import tandem
from tandem.model.registry import DEFAULT_MODEL

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
NUM_TOKENS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A and B drawn from N(0, LORA_STD^2): large enough that each adapter moves the logits by 11 or more
# and changes every prompt's greedy tokens, small enough that the text stays near the model's own.
LORA_STD = 0.05
# Measured: tandem's logits against transformers + PEFT's, every position of prompt + 16 greedy
# tokens, fp32: at most 9.2e-5 (logits reach |38|; the fused qkv / gate_up projections and the
# LoRA update add in another order than PEFT's separate ones), the greedy tokens' log-probabilities
# within 8.6e-6; each adapter moves the logits by 11 or more. Tolerance 1e-3 for both: 10x margin.
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Adapters "one" and "two" saved in PEFT's format, and transformers + PEFT's greedy tokens and
    logits (prompt + greedy tokens, every position) for each adapter and prompt."""
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tandem.model.loader import load_tokenizer

    tokenizer, _, path = load_tokenizer(DEFAULT_MODEL)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    base = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(base, config, adapter_name="one")
    model.add_adapter("two", config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero: every A and B random instead
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(LORA_STD * torch.randn(param.shape, generator=generator))
    root = tmp_path_factory.mktemp("lora_default")
    model.save_pretrained(str(root))  # one directory per adapter: root/one, root/two
    tokens, logits = {}, {}
    # the prompts left-padded into one batch per adapter (measured: the tokens and teacher-forced
    # logits of one prompt at a time, exactly)
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        for adapter in ("one", "two"):
            model.set_adapter(adapter)
            out = model.generate(batch, attention_mask=mask, max_new_tokens=NUM_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            for i, prompt in enumerate(prompts):
                tokens[adapter, i] = out[i, width:].tolist()
                # (T, vocab): teacher-forced on prompt + greedy tokens, unpadded
                logits[adapter, i] = model(torch.tensor([prompt + tokens[adapter, i]])).logits[0]
    del model, base
    gc.collect()
    return {"dirs": {name: str(root / name) for name in ("one", "two")}, "prompts": prompts, "tokens": tokens,
            "logits": logits}


@pytest.fixture(scope="module")
def served(reference):
    return tandem.LLM(DEFAULT_MODEL, progress=False, quantization="none", lora_modules=reference["dirs"],
                      max_loras=2, max_lora_rank=8, num_kv_blocks=64)


GREEDY = tandem.SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)


@contextmanager
def _adapter(llm: tandem.LLM, name: str | None):
    """Every token of the next forwards through the adapter's slot (None: the bare base)."""
    if name is None:
        yield
        return
    slot = llm.lora.acquire(name)
    try:
        yield slot
    finally:
        llm.model.lora_context.set_slots(None)
        llm.lora.release(name)


def _logits(llm: tandem.LLM, ids: list[int], name: str | None) -> torch.Tensor:
    with _adapter(llm, name) as slot, torch.inference_mode():
        if name is not None:
            llm.model.lora_context.set_slots(torch.full((len(ids),), slot))
        return llm.model.compute_logits(llm.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0)))[0]


def test_logits_match_transformers_peft(served, reference):
    assert [served.tokenize(p) for p in PROMPTS] == reference["prompts"]
    for (adapter, i), want in reference["logits"].items():
        ids = reference["prompts"][i] + reference["tokens"][adapter, i]
        got = _logits(served, ids, adapter)
        diff = float((got - want).abs().max())
        assert diff < LOGITS_ATOL, (adapter, PROMPTS[i], diff)
        moved = float((got - _logits(served, ids, None)).abs().max())
        assert moved > 1.0, (adapter, PROMPTS[i], moved)  # the adapter does act


@pytest.fixture(scope="module")
def alone(served, reference):
    """Every prompt through "one", "two" and the bare base, each in a batch of its own adapter's only."""
    return {(name, i): out for name in ("one", "two", None)
            for i, out in enumerate(served.generate(reference["prompts"], GREEDY, lora=name))}


def test_greedy_tokens_match_transformers_peft(alone, reference):
    for (adapter, i), want in reference["tokens"].items():
        out = alone[adapter, i]
        assert out.token_ids == want, (adapter, PROMPTS[i])
        assert out.token_ids != alone[None, i].token_ids, (adapter, PROMPTS[i])  # the adapter changes the text
        # the engine's own path (the runner's per-token slots): each token's log-probability
        ref = torch.log_softmax(reference["logits"][adapter, i], -1)
        start = len(reference["prompts"][i]) - 1
        want_logprobs = [float(ref[start + step, token]) for step, token in enumerate(want)]
        assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(want_logprobs, abs=LOGITS_ATOL)


def test_a_batch_mixing_two_adapters_and_the_base_gives_each_row_its_own(served, alone, reference):
    rows = [(name, i) for i in range(len(PROMPTS)) for name in ("one", "two", None)]
    mixed = served.generate([reference["prompts"][i] for _, i in rows], GREEDY, lora=[name for name, _ in rows])
    assert [o.token_ids for o in mixed] == [alone[row].token_ids for row in rows]
    assert served.lora.slots.users == {"one": 0, "two": 0}  # every slot released

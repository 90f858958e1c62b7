"""LoRA adapters on tandem's CPU extension (kernels/csrc/lora_cpu.cpp): `lora_add` against its torch
reference (tandem.model.lora.lora_delta) over ragged shapes, and the fused C++ layer with a step's
adapters against the eager layers (LoRAProjection) on a batch mixing two adapters, the bare base, a
prefill chunk and decode tokens. Skipped, with the reason, where the kernels do not run."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.kernels import cpu
from tandem.model.lora import group_by_slot, lora_delta, slot_groups
from tests.tiny_models import write_peft_adapter, write_tiny_gguf

REASON = cpu.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"tandem's CPU kernels are unavailable: {REASON}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("part_outs", [[40], [24, 9, 9], [130, 130]])
@pytest.mark.parametrize("fan_in", [16, 37, 200])
def test_lora_add_matches_lora_delta(part_outs, fan_in, dtype):
    """Runs longer than the kernel's 4-token blocks and of one token, a slot holding a lower rank
    (zero-padded), base tokens between; widths off the 16 lanes; fp32 or fp16 slots (both computed
    in fp32, the same tolerance). Base rows are left bit for bit."""
    g = torch.Generator().manual_seed(fan_in)
    num_slots, rank, out = 3, 8, sum(part_outs)
    a = torch.randn(num_slots, len(part_outs) * rank, fan_in, generator=g).to(dtype)
    bt = torch.randn(num_slots, rank, out, generator=g).to(dtype)
    a[1].view(len(part_outs), rank, fan_in)[:, 5:] = 0  # slot 1 holds a rank-5 adapter
    bt[1, 5:] = 0
    slots = torch.tensor([2] * 9 + [-1] * 3 + [0, 2, -1] + [0] * 5 + [1, 1])
    x, y = torch.randn(len(slots), fan_in, generator=g), torch.randn(len(slots), out, generator=g)
    scaling = torch.tensor([0.5, 2.0, 1.5])
    want = y + lora_delta(x, a, bt, part_outs, scaling, slot_groups(slots))
    got = y.clone()
    ends = torch.tensor(part_outs).cumsum(0).tolist()
    cpu.extension().lora_add(got, x, a, bt, ends, *group_by_slot(slots), scaling)
    assert torch.equal(got[slots < 0], y[slots < 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_lora_add_refuses_bad_input():
    x, y = torch.randn(3, 16), torch.randn(3, 8)
    a, bt, scaling = torch.randn(2, 4, 16), torch.randn(2, 4, 8), torch.ones(2)
    add = cpu.extension().lora_add
    with pytest.raises(RuntimeError, match="run 0 .slot 2. is out of range"):
        add(y, x, a, bt, [8], torch.tensor([0]), torch.tensor([[2, 0, 1]]), scaling)
    with pytest.raises(RuntimeError, match="order names token 3 of 3"):
        add(y, x, a, bt, [8], torch.tensor([3]), torch.tensor([[0, 0, 1]]), scaling)
    with pytest.raises(RuntimeError, match="last part end 8"):
        add(y, x, a, bt, [4, 6], torch.tensor([0]), torch.tensor([[0, 0, 1]]), scaling)
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        add(y, x, a.half(), bt, [8], torch.tensor([0]), torch.tensor([[0, 0, 1]]), scaling)


@pytest.fixture(scope="module")
def lora_q4_llm(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_q4")
    path = write_tiny_gguf(tiny_hf_dir, root / "tiny-q4_1.gguf", "Q4_1")
    adapters = {name: str(write_peft_adapter(tiny_hf_dir, root / name, rank=rank, alpha=2 * rank, seed=seed)[0])
                for name, rank, seed in (("one", 8, 1), ("two", 4, 2))}
    return tandem.LLM(str(path), progress=False, num_kv_blocks=32, block_size=4, lora_modules=adapters,
                      max_loras=2, max_lora_rank=8)


def _steps(one: int, two: int) -> list:
    """Two steps of four sequences (blocks of 4 tokens): A (adapter one, 6-token prompt), B (the
    bare base, 5), D (adapter two, 3) prefill; then A, B and D decode while C (adapter two) prefills
    a 7-token chunk: the step's adapter-two tokens are not contiguous. Every row's logits wanted."""
    from tandem.engine.model_runner import StepInputs

    tables = {"A": [0, 1], "B": [2, 3], "C": [4, 5], "D": [6]}
    first = [("A", 6, one), ("B", 5, -1), ("D", 3, two)]
    second = [("A", 1, one), ("B", 1, -1), ("C", 7, two), ("D", 1, two)]
    done = {"A": 0, "B": 0, "C": 0, "D": 0}
    steps = []
    for plan in (first, second):
        tokens, positions, rows = [], [], []
        for name, num, _ in plan:
            start = done[name]
            tokens += [(31 * ord(name) + 7 * p) % 300 + 3 for p in range(start, start + num)]
            positions += range(start, start + num)
            rows.append((tables[name], start, num))
            done[name] += num
        steps.append(StepInputs(tokens, positions, rows, list(range(len(tokens))), [s for _, _, s in plan]))
    return steps


def _run(llm, steps, fused: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """Each step's logits (every row), and how many fused_layer calls ran them."""
    kernels, calls = cpu.ops(), []
    layer = kernels.fused_layer
    monkeypatch.setattr(kernels, "fused_layer", lambda *args: calls.append(1) or layer(*args))
    llm.model.fused_layers = fused
    try:
        return [llm.engine.runner.run(step) for step in steps], len(calls)
    finally:
        llm.model.fused_layers = True
        monkeypatch.setattr(kernels, "fused_layer", layer)


def test_fused_layer_with_adapters_matches_the_eager_layers(lora_q4_llm, monkeypatch):
    """Logits of every row agree to 1e-5 of their largest magnitude (rtol 1e-5): the base
    projections are the same kernels, the LoRA updates add the same products in another order
    (measured: 2.6e-7 of the largest logit). Rows of the bare base are those of a step without adapters
    bit for bit; rows of either adapter differ from them by far more than the tolerance."""
    llm = lora_q4_llm
    assert llm.model.model.layers[0].mlp.down_proj.lora_bt.dtype == torch.float16  # GGML blocks: fp16 slots
    one, two = llm.lora.acquire("one"), llm.lora.acquire("two")
    try:
        steps = _steps(one, two)
        fused, fused_calls = _run(llm, steps, True, monkeypatch)
        eager, eager_calls = _run(llm, steps, False, monkeypatch)
        for step in steps:
            step.lora_slots = None
        bare, _ = _run(llm, steps, True, monkeypatch)
    finally:
        llm.lora.release("one")
        llm.lora.release("two")
    layers = llm.config.num_layers
    assert (fused_calls, eager_calls) == (2 * layers, 0)  # the adapters' steps stayed on the fused layer
    for got, want, base, step in zip(fused, eager, bare, _steps(one, two)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        slots = torch.tensor(step.lora_slots).repeat_interleave(torch.tensor([n for _, _, n in step.rows]))
        assert torch.equal(got[slots < 0], base[slots < 0])
        for slot in (one, two):
            assert (got[slots == slot] - base[slots == slot]).abs().amax(1).min() > 1e-2 * float(want.abs().max())

"""LoRA adapters (tandem.model.lora) against PEFT: an adapter made with PEFT on the tiny Llama
(rank 8, all seven projections, random non-zero A and B) gives in tandem the logits PEFT gives
(fp32: 1e-4, the fused projections add in another order); a batch mixing two adapters and the bare
base gives each row what it gets alone; bad adapters are refused by name and change nothing; the
slots are reused least recently used first."""
from __future__ import annotations

import json

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tandem.model.lora import AdapterFormat, LoRAAdapter, LoRASlots, attach_lora, bgmv, load_peft_adapter
from tests.tiny_models import write_peft_adapter


@pytest.fixture(scope="module")
def adapters(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {name: write_peft_adapter(tiny_hf_dir, root / name, rank=rank, alpha=alpha, seed=seed)
            for name, rank, alpha, seed in (("one", 8, 16, 1), ("two", 4, 8, 2))}


@pytest.fixture(scope="module")
def lora_llm(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=16)
    context = attach_lora(llm.model, max_loras=2, max_rank=8)
    return llm, context, LoRASlots(llm.model, context, 2)


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))


def test_logits_match_peft_alone_and_in_a_mixed_batch(adapters, lora_llm):
    llm, context, slots = lora_llm
    ids = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    refs = []
    for name in ("one", "two"):
        path, peft_model = adapters[name]
        slot = slots.acquire(load_peft_adapter(name, path, llm.config, max_rank=8))
        with torch.inference_mode():
            refs.append(peft_model(ids[:1]).logits[0])
        context.set_slots(torch.full((20,), slot))
        ours = _forward(llm.model, ids[:1])[0]
        torch.testing.assert_close(ours, refs[-1], rtol=1e-4, atol=1e-4 * float(refs[-1].abs().max()))
        slots.release(name)
    context.set_slots(None)
    base = _forward(llm.model, ids[2:3])[0]
    mixed_slots = torch.tensor([slots.slot_of["one"]] * 20 + [slots.slot_of["two"]] * 20 + [-1] * 20)
    context.set_slots(mixed_slots)
    mixed = _forward(llm.model, torch.cat([ids[:1], ids[:1], ids[2:3]]))
    context.set_slots(None)
    torch.testing.assert_close(mixed[0], refs[0], rtol=1e-4, atol=1e-4 * float(refs[0].abs().max()))
    torch.testing.assert_close(mixed[1], refs[1], rtol=1e-4, atol=1e-4 * float(refs[1].abs().max()))
    assert torch.equal(mixed[2], base)  # the bare base row is untouched
    bare = _forward(llm.model, ids[:1])[0]
    assert (refs[0] - bare).abs().max() > 0.1 and (refs[1] - bare).abs().max() > 0.1  # the adapters do act


def test_bgmv_groups_tokens_by_slot():
    x = torch.randn(7, 5)
    a, b = torch.randn(3, 2, 5), torch.randn(3, 4, 2)
    slots, scaling = torch.tensor([0, 2, -1, 0, 1, 2, -1]), torch.tensor([0.5, 1.0, 2.0])
    got = bgmv(x, a, b, slots, scaling)
    for n, s in enumerate(slots.tolist()):
        want = torch.zeros(4) if s < 0 else scaling[s] * (b[s] @ (a[s] @ x[n]))
        torch.testing.assert_close(got[n], want)


def test_bad_adapters_are_refused_by_name(adapters, tiny_hf_dir, tmp_path):
    config = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=8).config
    path, _ = adapters["one"]
    with pytest.raises(ConfigError, match="rank 8 exceeds max_lora_rank 4"):
        load_peft_adapter("one", path, config, max_rank=4)
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        load_peft_adapter("none", tmp_path, config, max_rank=8)
    wrong = json.loads((path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**wrong, "r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"has A \(8, [0-9]+\) .* needs A \(4, [0-9]+\)"):
        load_peft_adapter("wrong", tmp_path, config, max_rank=8)


def test_slots_are_reused_least_recently_used_first(adapters, tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=8)
    context = attach_lora(llm.model, max_loras=1, max_rank=8)
    slots = LoRASlots(llm.model, context, 1)
    one = load_peft_adapter("one", adapters["one"][0], llm.config, 8)
    two = load_peft_adapter("two", adapters["two"][0], llm.config, 8)
    assert slots.acquire(one) == 0
    with pytest.raises(RuntimeError, match="in use by running requests"):
        slots.acquire(two)
    slots.release("one")
    assert slots.acquire(two) == 0 and list(slots.slot_of) == ["two"]
    assert float(context.scaling[0]) == 2.0  # alpha 8 / rank 4


# -- through the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_hf_dir, adapters):
    return tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=128, block_size=4,
                      lora_modules={name: str(path) for name, (path, _) in adapters.items()}, max_loras=2,
                      max_lora_rank=8)


def _peft_greedy(peft_model, prompt: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        out = peft_model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_generate_with_an_adapter_gives_pefts_greedy_tokens_and_a_mixed_batch_each_its_own(served, adapters):
    prompt = torch.randint(3, 320, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    greedy = tandem.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = {name: _peft_greedy(model, prompt, 10) for name, (_, model) in adapters.items()}
    alone = {name: served.generate(prompt, greedy, lora=name)[0].token_ids for name in want}
    base = served.generate(prompt, greedy)[0].token_ids
    assert alone == want and base not in want.values()
    mixed = served.generate([prompt, prompt, prompt], greedy, lora=["one", None, "two"])
    assert [o.token_ids for o in mixed] == [want["one"], base, want["two"]]
    assert served.lora.slots.users == {"one": 0, "two": 0}  # every slot released


def test_adapters_never_share_kv_and_load_unload_at_run_time(served, adapters, tmp_path):
    prompt = list(range(40, 80))
    greedy = tandem.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    first = served.generate(prompt, greedy, lora="one")[0]
    again = served.generate(prompt, greedy, lora="one")[0]
    other = served.generate(prompt, greedy, lora="two")[0]
    assert first.metrics.num_cached_tokens == 0 and again.metrics.num_cached_tokens > 0
    assert other.metrics.num_cached_tokens == 0  # the same prompt, another adapter: nothing shared
    with pytest.raises(tandem.InvalidRequestError, match="unknown LoRA adapter 'three'"):
        served.generate(prompt, greedy, lora="three")
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        served.load_lora("three", str(tmp_path))
    assert served.loras == ["one", "two"]
    served.unload_lora("two")
    served.load_lora("two", str(adapters["two"][0]))
    assert served.generate(prompt, greedy, lora="two")[0].token_ids == other.token_ids


def test_more_adapters_than_slots_wait_for_a_slot_instead_of_failing(tiny_hf_dir, adapters):
    """max_loras=1 and a batch naming two adapters and the base: the second adapter's request waits
    until the first one's slot is free (the base runs beside both), and every row gets its own
    tokens; an adapter named by a waiting or running request cannot be unloaded."""
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=128, block_size=4,
                     lora_modules={name: str(path) for name, (path, _) in adapters.items()}, max_loras=1,
                     max_lora_rank=8)
    prompt = list(range(30, 50))
    greedy = tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = {name: llm.generate(prompt, greedy, lora=name)[0].token_ids for name in ("one", "two", None)}
    mixed = llm.generate([prompt] * 4, greedy, lora=["one", "two", None, "one"])
    assert [o.token_ids for o in mixed] == [alone["one"], alone["two"], alone[None], alone["one"]]
    llm.engine.add_request("held", prompt, greedy, lora="two")
    stats = llm.engine.stats()
    assert (stats["lora_adapters_loaded"], stats["lora_slots_total"], stats["lora_requests_waiting_for_slot"]) == (2, 1, 1)
    assert stats["lora_slot_loads"] >= 4  # one, two, one again (LRU of one slot), two
    with pytest.raises(ConfigError, match="in use by requests"):
        llm.unload_lora("two")
    llm.engine.abort("held")
    assert llm.lora.holders == {"one": 0, "two": 0} and llm.lora.slots.users == {"one": 0, "two": 0}
    llm.unload_lora("two")


def test_score_through_an_adapter_gives_its_generated_tokens_logprobs(served):
    """LLM.score(ids, lora=name): the teacher-forced log-probabilities of a greedy continuation
    generated with the adapter equal generate's own (and differ from the base's score)."""
    prompt = list(range(60, 75))
    out = served.generate(prompt, tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
                          lora="one")[0]
    scored = served.score(prompt + out.token_ids, lora="one")
    want = [entry.logprob for entry in out.outputs[0].logprobs]
    assert scored.argmax_ids[-6:] == out.token_ids
    assert torch.allclose(torch.tensor(scored.logprobs[-6:]), torch.tensor(want), atol=1e-4)
    base = served.score(prompt + out.token_ids)
    assert not torch.allclose(torch.tensor(base.logprobs[-6:]), torch.tensor(want), atol=1e-2)
    assert served.lora.slots.users.get("one") == 0


class _OneFileFormat(AdapterFormat):
    """A third-party format for the tests: every A and B in one safetensors file, lora.safetensors,
    keyed "LAYER.PROJECTION.A" / ".B", rank 8, alpha 16."""

    name = "one_file"

    def detect(self, path):
        return (path / "lora.safetensors").is_file()

    def load(self, name, path, config, max_rank):
        from safetensors.torch import load_file

        tensors = load_file(str(path / "lora.safetensors"))
        weights = {}
        for key in tensors:
            layer, projection, which = key.split(".")
            if which == "A":
                weights[(int(layer), projection)] = (tensors[key], tensors[f"{layer}.{projection}.B"])
        return LoRAAdapter(name, 8, 2.0, weights, "one-file:" + str(sum(float(t.sum()) for t in tensors.values())))


class _Broken(AdapterFormat):
    name = "broken"

    def detect(self, path):
        return (path / "broken").exists()

    def load(self, name, path, config, max_rank):
        raise KeyError("a bug")


def test_a_plugins_adapter_format_loads_like_peft_and_is_checked(tiny_hf_dir, adapters, tmp_path):
    """An adapter format from a plugin (hook tandem_adapter_formats) is asked before PEFT's; the
    same weights in its format give PEFT's tokens; what it loads is checked against the model
    (a wrong shape is a ConfigError) and its bugs are PluginErrors naming it."""
    from safetensors.torch import save_file

    from tandem.errors import PluginError
    from tandem.plugins import PluginManager, hookimpl
    from tandem.plugins.testing import check_adapter_format

    class Plugin:
        @hookimpl
        def tandem_adapter_formats(self):
            return [_OneFileFormat, _Broken]

    manager = PluginManager(entry_points=False)
    manager.register(Plugin(), "formats")
    assert manager.names("adapter_format") == ["broken", "one_file", "peft"]
    peft_dir, _ = adapters["one"]
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=64, plugins=manager,
                     lora_modules={"peft": str(peft_dir)}, max_loras=2, max_lora_rank=8)
    peft = llm.lora.adapters["peft"]
    save_file({f"{layer}.{projection}.{which}": t.contiguous() for (layer, projection), pair in peft.weights.items()
               for which, t in zip("AB", pair)}, str(tmp_path / "lora.safetensors"))
    llm.load_lora("mine", str(tmp_path))
    prompt, greedy = list(range(10, 30)), tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert llm.generate(prompt, greedy, lora="mine")[0].token_ids == llm.generate(prompt, greedy, lora="peft")[0].token_ids
    check_adapter_format(_OneFileFormat, tmp_path, llm.config, max_rank=8)
    check_adapter_format(manager.get("adapter_format", "peft"), peft_dir, llm.config, max_rank=8)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({"0.q_proj.A": torch.zeros(8, 3), "0.q_proj.B": torch.zeros(5, 8)}, str(wrong / "lora.safetensors"))
    with pytest.raises(ConfigError, match="layer 0 q_proj has A"):
        llm.load_lora("wrong", str(wrong))
    (tmp_path / "broken").touch()
    with pytest.raises(PluginError, match="adapter format 'broken' failed on LoRA adapter 'bug'"):
        llm.load_lora("bug", str(tmp_path))
    assert llm.loras == ["peft", "mine"]

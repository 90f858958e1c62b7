"""What a plugin author written from docs/plugins.md alone tripped on (issue 16, item 7), each
pinned: a component needing a newer API is refused alone; a variant that is not causal is refused
when it loads (and when an engine builds it with options); a misspelt hook fails its plugin with
the closest hook's name; `tandem plugins list` names the components a failed plugin lost; the
example package can build its own metadata; and the docs say what the code does."""
from __future__ import annotations

import re
import tomllib
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import tandem
from tandem.draft import DraftProposer
from tandem.errors import ConfigError, PluginError
from tandem.plugins import API_VERSION, AttentionVariant, LogitsProcessor, PluginManager, hookimpl, hookspecs
from tandem.sampling import SamplerPipeline, SamplingBatch, make_generator
from tests.unit.plugins.test_plugin_manager import plugin_module, processor

ROOT = Path(__file__).resolve().parents[3]
DOCS = (ROOT / "docs" / "plugins.md").read_text()


class Bidirectional(AttentionVariant):
    """Every query sees every key: an encoder's mask, wrong for a decoder's KV cache."""

    name = "bidirectional"

    def allowed(self, q_pos, k_pos):
        return (k_pos >= 0) & (q_pos >= 0)


class Lookahead(AttentionVariant):
    """Causal by default; `peek` > 0 lets a query see later keys."""

    name = "lookahead"

    def __init__(self, peek: int = 0):
        self.peek = peek

    def allowed(self, q_pos, k_pos):
        return k_pos <= q_pos + self.peek


class Blind(AttentionVariant):
    """Hides each query's own key (a fully masked first row)."""

    name = "blind"

    def allowed(self, q_pos, k_pos):
        return k_pos < q_pos


@pytest.fixture
def manager():
    return PluginManager(entry_points=False)


def rows_of(manager: PluginManager, plugin: str) -> dict[str, dict]:
    return {row["name"]: row for row in manager.plugins[plugin].rows()}


# -- a component that needs a newer API is refused alone ------------------------------------------

def test_a_component_needing_a_newer_api_is_refused_and_the_rest_loads(manager):
    mixed = plugin_module("mixed", tandem_logits_processors=lambda: [processor("now"),
                                                                     processor("future", API_VERSION + 1)])
    info = manager.register(mixed, "mixed")  # strict: the plugin itself is not refused
    assert info.loaded and info.components == [("logits_processor", "now")]
    why = f"needs plugin API {API_VERSION + 1}; this tandem has {API_VERSION}"
    assert info.refused == [("logits_processor", "future", why)]
    assert "now" in manager.names("logits_processor") and "future" not in manager.names("logits_processor")
    with pytest.raises(ConfigError, match=f"logits processor 'future' from plugin 'mixed' was refused: {why}"):
        manager.get("logits_processor", "future")
    rows = rows_of(manager, "mixed")
    assert rows["now"]["status"] == "loaded" and rows["now"]["loaded"]
    assert rows["future"]["status"] == f"refused: {why}" and not rows["future"]["loaded"]


def test_a_newer_component_may_share_its_name_with_the_fallback_it_replaces(manager):
    versions = plugin_module("versions", tandem_logits_processors=lambda: [processor("tp", API_VERSION + 1),
                                                                           processor("tp")])
    info = manager.register(versions, "versions")
    assert info.loaded and info.components == [("logits_processor", "tp")]
    assert manager.get("logits_processor", "tp").api_version == API_VERSION


# -- a variant that is not causal ---------------------------------------------------------------------

def test_a_variant_that_is_not_causal_is_refused_when_it_loads(manager):
    info = manager.register(plugin_module("v", tandem_attention_variants=lambda: [Bidirectional, Blind, Lookahead]),
                            "v")
    assert info.loaded and info.components == [("attention_variant", "lookahead")]
    refused = {name: why for _, name, why in info.refused}
    assert sorted(refused) == ["bidirectional", "blind"]
    assert "not causal" in refused["bidirectional"] and "query 0 sees key 1" in refused["bidirectional"]
    assert "its own key" in refused["blind"]
    with pytest.raises(ConfigError, match="variant 'bidirectional' from plugin 'v' was refused: .*not causal"):
        manager.create("attention_variant", "bidirectional")
    assert rows_of(manager, "v")["bidirectional"]["status"].startswith("refused: ")


def test_a_variant_made_non_causal_by_its_options_fails_when_an_engine_builds_it(manager, tiny_hf_dir):
    manager.register(plugin_module("v", tandem_attention_variants=lambda: [Lookahead]), "v")
    assert manager.create("attention_variant", "lookahead", {"peek": 0}).peek == 0
    with pytest.raises(PluginError, match="attention variant 'lookahead' from plugin 'v' .*not causal"):
        manager.create("attention_variant", "lookahead", {"peek": 2})
    with pytest.raises(PluginError, match="not causal"):
        tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=16, plugins=manager,
                   attention="lookahead", attention_options={"peek": 2})


def test_the_check_sees_past_the_first_positions(manager):
    class LateLeak(AttentionVariant):  # causal for the first 1000 positions only
        name = "late_leak"

        def allowed(self, q_pos, k_pos):
            return (k_pos <= q_pos) | ((q_pos >= 1000) & (k_pos == q_pos + 1))

    info = manager.register(plugin_module("late", tandem_attention_variants=lambda: [LateLeak]), "late")
    assert info.components == [] and "not causal" in info.refused[0][2]


# -- a misspelt hook ------------------------------------------------------------------------------------

def test_a_misspelt_hook_fails_its_plugin_naming_the_closest_hook(manager):
    typo = plugin_module("typo", tandem_logit_processors=lambda: [processor("typo_p")])
    info = manager.register(typo, "typo", strict=False)
    assert not info.loaded
    assert info.error == ("unknown hook 'tandem_logit_processors': tandem has no such hook "
                          "(did you mean 'tandem_logits_processors'?)")
    with pytest.raises(PluginError, match="unknown hook 'tandem_quantizer'.*did you mean 'tandem_quantizers'"):
        manager.register(plugin_module("typo2", tandem_quantizer=lambda: []), "typo2")
    assert manager.register(plugin_module("fine", tandem_quantizers=lambda: []), "fine").loaded


def test_an_optional_hook_tandem_does_not_have_yet_is_allowed(manager):
    module = types.ModuleType("forward")
    module.tandem_future_things = hookimpl(optionalhook=True)(lambda: [])
    module.tandem_logits_processors = hookimpl(lambda: [processor("fwd")])
    assert manager.register(module, "forward").components == [("logits_processor", "fwd")]


def test_a_hook_function_without_hookimpl_fails_its_plugin(manager):
    module = types.ModuleType("unmarked")
    module.tandem_logits_processors = lambda: [processor("never")]
    info = manager.register(module, "unmarked", strict=False)
    assert not info.loaded and "tandem_logits_processors is not marked @hookimpl" in info.error


# -- plugins list names what a failed plugin lost ---------------------------------------------------

def test_a_failed_plugin_lists_the_components_it_lost(manager):
    def boom():
        raise RuntimeError("kaput")
    clash = plugin_module("clash", tandem_logits_processors=lambda: [processor("mine"), processor("top_k")],
                          tandem_quantizers=boom)
    info = manager.register(clash, "clash", strict=False)
    assert not info.loaded and info.components == []
    assert [(c, n) for c, n, _ in info.refused] == [("logits_processor", "mine"), ("logits_processor", "top_k")]
    rows = rows_of(manager, "clash")
    assert set(rows) == {"mine", "top_k"}
    assert all(not r["loaded"] and r["status"] == f"not loaded: {info.error}" for r in rows.values())
    assert "mine" not in manager.names("logits_processor")


def test_cli_rows_come_from_the_manager(manager, monkeypatch, capsys):
    from tandem import cli

    manager.register(plugin_module("mixed", tandem_logits_processors=lambda: [processor("now"),
                                                                             processor("future", API_VERSION + 1)]),
                     "mixed")
    monkeypatch.setattr("tandem.plugins.get_plugin_manager", lambda allow=None: manager)
    assert cli.main(["plugins", "list"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " mixed " in line]
    assert len(lines) == 2 and any("future" in line and "refused: needs plugin API" in line for line in lines)


# -- the example package and the docs -----------------------------------------------------------------

def test_the_example_package_requires_a_setuptools_that_reads_its_license_field():
    project = tomllib.loads((ROOT / "examples" / "tandem-plugin-example" / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # PEP 639 SPDX string: setuptools 77+
    setuptools = next(Requirement(r) for r in project["build-system"]["requires"]
                      if Requirement(r).name == "setuptools")
    assert not any(setuptools.specifier.contains(v) for v in ("68.0", "75.8.0", "76.1.0"))
    assert setuptools.specifier.contains("77.0.3")


def test_the_docs_name_every_hook_and_where_the_hookspecs_live():
    specs = sorted(n for n in vars(hookspecs) if n.startswith("tandem_"))
    table = re.findall(r"^\| `(tandem_\w+)` \|", DOCS, re.M)
    assert sorted(table) == specs
    assert "tandem/plugins/hookspecs.py" not in DOCS
    assert "`plugins/hookspecs.py`" in DOCS and "`tandem.plugins.hookspecs`" in DOCS


def test_the_docs_answer_what_the_author_had_to_guess():
    assert "--logits-processor" in DOCS
    assert "Under greedy decoding" in DOCS  # processors run, then argmax
    assert "one instance per engine" in DOCS  # a proposer's lifetime
    assert "did you mean" in DOCS and "refused" in DOCS and "not causal" in DOCS


# -- the documented behaviour, pinned -----------------------------------------------------------------

class BanTop(LogitsProcessor):
    name = "ban_top"

    def __call__(self, logits, args, batch):
        out = logits.clone()
        for row, arg in enumerate(args):
            if arg is not None:
                out[row, logits[row].argmax()] = float("-inf")
        return out


def test_logits_processors_run_under_greedy_decoding():
    pipeline = SamplerPipeline([BanTop()], 5)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0]] * 2)
    on = tandem.SamplingParams(temperature=0, logits_processors={"ban_top": {}})
    off = tandem.SamplingParams(temperature=0)
    batch = SamplingBatch([on, off], [[1], [1]], [1, 1], [make_generator(0), make_generator(0)])
    assert pipeline.sample(logits, batch).tokens == [3, 1]  # argmax of the processed logits


class CountingProposer(DraftProposer):
    name = "counting"
    instances: list = []

    def __init__(self):
        self.contexts: list[list[int]] = []
        CountingProposer.instances.append(self)

    def propose(self, token_ids, num_tokens):
        self.contexts.append(list(token_ids))
        return []


def test_one_proposer_instance_serves_every_request(manager, tiny_hf_dir, monkeypatch):
    monkeypatch.setattr(CountingProposer, "instances", [])
    manager.register(plugin_module("counting", tandem_draft_proposers=lambda: [CountingProposer]), "counting")
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64, plugins=manager,
                     speculative={"method": "counting", "k": 2})
    params = tandem.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([[3, 4, 5], [7, 8, 9, 10]], params)
    llm.generate([[11, 12]], params)
    assert len(CountingProposer.instances) == 1
    starts = {tuple(c[:2]) for c in CountingProposer.instances[0].contexts}
    assert starts == {(3, 4), (7, 8), (11, 12)}  # every sequence of every request, one instance

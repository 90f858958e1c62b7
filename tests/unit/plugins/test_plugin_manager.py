"""The plugin manager: built-ins load like third-party plugins; a broken plugin is reported by
name and the others go on; duplicate names are refused with a message naming the first owner;
unknown names list what is available; hookspecs are documented."""
from __future__ import annotations

import types
from importlib import metadata

import pytest

from tandem.errors import ConfigError, PluginError
from tandem.plugins import (CATEGORIES, DEFAULT_PLUGINS, LogitsProcessor, PluginManager, hookimpl,
                            hookspecs)


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def processor(name: str, api_version: int = 1) -> type:
    return type(f"P_{name}", (LogitsProcessor,), {"name": name, "api_version": api_version,
                                                  "__call__": lambda self, logits, args, batch: logits})


@pytest.fixture
def manager():
    return PluginManager(entry_points=False)


def test_builtins_load_and_cover_every_category(manager):
    assert [p for p in manager.plugins] == list(DEFAULT_PLUGINS)
    assert all(info.loaded and info.source == "built-in" for info in manager.plugins.values())
    assert manager.names("attention_variant") == ["alibi", "causal", "h2o", "local_global", "sinks", "sliding_window"]
    assert manager.names("attention_backend") == ["naive", "sdpa", "triton"]
    assert manager.names("quantizer") == ["fp8", "int4", "int4_triton", "int8", "int8_triton", "nf4"]
    assert manager.names("kv_cache_format") == ["auto", "int8"]
    assert manager.names("draft_proposer") == ["draft_model", "ngram", "remote"]
    assert manager.names("embedder") == ["all-MiniLM-L6-v2"]
    assert manager.names("adapter_format") == ["peft"]
    assert set(manager.names("logits_processor")) == {"logit_bias", "repetition_penalty", "presence_frequency_penalty",
                                                      "temperature", "top_k", "top_p", "min_p", "structured_output"}


def test_unknown_name_lists_the_available_ones(manager):
    with pytest.raises(ConfigError, match="unknown quantizer 'int3'; available: fp8, int4, int4_triton, int8, int8_triton, nf4"):
        manager.get("quantizer", "int3")


def test_bad_options_are_a_config_error(manager):
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        manager.create("attention_variant", "sliding_window", {"window": 0})
    with pytest.raises(ConfigError, match="bad options"):
        manager.create("attention_variant", "sliding_window", {"widnow": 4})
    with pytest.raises(ConfigError, match="group_size must be one of"):
        manager.create("quantizer", "int4", {"group_size": 48})


def test_duplicate_plugin_name_is_refused(manager):
    with pytest.raises(PluginError, match="a plugin named 'tandem.plugins.samplers' is already registered"):
        manager.register(plugin_module("x"), "tandem.plugins.samplers")


def test_duplicate_component_name_names_the_first_owner_and_keeps_it(manager):
    dup = plugin_module("dup", tandem_logits_processors=lambda: [processor("top_k")])
    info = manager.register(dup, "dup", strict=False)
    assert not info.loaded
    assert "duplicate logits_processor name 'top_k': already provided by 'tandem.plugins.samplers'" in info.error
    assert manager.owner("logits_processor", "top_k") == "tandem.plugins.samplers"


def test_a_plugin_is_registered_whole_or_not_at_all(manager):
    # the second component is bad, so the first must not be registered either
    bad = plugin_module("half", tandem_logits_processors=lambda: [processor("fine"), object])
    info = manager.register(bad, "half", strict=False)
    assert not info.loaded and "is not a subclass of tandem.plugins.LogitsProcessor" in info.error
    assert "fine" not in manager.names("logits_processor")
    ok = manager.register(plugin_module("later", tandem_logits_processors=lambda: [processor("fine")]), "later")
    assert ok.loaded and ok.components == [("logits_processor", "fine")]


def test_a_hook_that_raises_is_reported_by_name(manager):
    def boom(api_version):
        raise RuntimeError("kaput")
    info = manager.register(plugin_module("boom", tandem_quantizers=boom), "boom", strict=False)
    assert not info.loaded and "tandem_quantizers raised RuntimeError: kaput" in info.error


class FakeEntryPoint:
    def __init__(self, name, loader):
        self.name, self.value, self._loader = name, f"fake:{name}", loader
        self.dist = types.SimpleNamespace(name=f"pkg-{name}", version="1.0")

    def load(self):
        return self._loader()


def test_entry_points_load_once_and_a_broken_one_does_not_stop_the_others(monkeypatch):
    good = plugin_module("good", tandem_draft_proposers=lambda: [])
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        def broken():
            raise ImportError("no module named nowhere")
        return [FakeEntryPoint("broken", broken), FakeEntryPoint("good", lambda: good),
                FakeEntryPoint("tandem.plugins.attention", lambda: good)]

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    manager = PluginManager()
    assert calls == ["tandem"]
    assert manager.plugins["broken"].loaded is False
    assert manager.plugins["broken"].error == "import failed: ImportError: no module named nowhere"
    assert manager.plugins["broken"].source == "package pkg-broken 1.0"
    assert manager.plugins["good"].loaded
    clash = manager.plugins["tandem.plugins.attention (package pkg-tandem.plugins.attention 1.0)"]
    assert not clash.loaded and "already registered" in clash.error
    assert manager.plugins["tandem.plugins.attention"].loaded  # the built-in keeps its name


def test_every_hookspec_is_documented_like_pytests():
    specs = [getattr(hookspecs, hook) for hook, _ in CATEGORIES.values()]
    for spec in specs:
        doc = spec.__doc__
        assert ":param api_version:" in doc and ":returns:" in doc and "firstresult" in doc, spec.__name__
        assert "Called once" in doc and ".. versionadded::" in doc, spec.__name__
        assert "Example" in doc, spec.__name__


def test_the_plugins_allowlist():
    """Only listed third-party plugins load (never imported otherwise); the built-ins always do."""
    closed = PluginManager(allow=[])
    assert not closed.plugins["example"].loaded and closed.plugins["example"].error == "not in the plugins allowlist"
    assert all(closed.plugins[name].loaded for name in DEFAULT_PLUGINS)
    assert all(closed.owner(c, n) != "example" for c in CATEGORIES for n in closed.names(c))
    opened = PluginManager(allow=["example"])
    assert opened.plugins["example"].loaded
    with pytest.raises(ConfigError, match="list of plugin names"):
        PluginManager(allow="example")

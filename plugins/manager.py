"""The plugin manager: loads the built-ins and the "tandem" entry points once, collects each
plugin's components by category, and hands out components by name (pytest's PluginManager idea:
built-ins listed in DEFAULT_PLUGINS and registered exactly like third-party plugins).

An installed plugin runs its code with the server's rights as soon as it is imported: `allow` (the
config's `plugins:` list) names the third-party plugins that may load; the others are listed as not
loaded and never imported. The built-ins (DEFAULT_PLUGINS, tandem's own code) always load.

A plugin is registered whole or not at all: if importing it fails, a hook raises, a component
is not a subclass of its category's base class, needs a newer API, or reuses a name another
plugin took, the plugin is recorded as not loaded with the reason, and the others go on.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tandem.draft import DraftProposer
from tandem.rag.embedding import Embedder
from tandem.errors import ConfigError, PluginError
from tandem.model.attention import AttentionBackend, AttentionVariant
from tandem.model.kv_pool import KVCacheFormat
from tandem.model.quantization import Quantizer
from tandem.plugins import API_VERSION, ENTRY_POINT_GROUP, PROJECT_NAME, hookspecs
from tandem.sampling import LogitsProcessor, SamplerPipeline

log = logging.getLogger(__name__)

# category -> (hook name, base class)
CATEGORIES: dict[str, tuple[str, type]] = {
    "logits_processor": ("tandem_logits_processors", LogitsProcessor),
    "attention_variant": ("tandem_attention_variants", AttentionVariant),
    "attention_backend": ("tandem_attention_backends", AttentionBackend),
    "quantizer": ("tandem_quantizers", Quantizer),
    "kv_cache_format": ("tandem_kv_cache_formats", KVCacheFormat),
    "draft_proposer": ("tandem_draft_proposers", DraftProposer),
    "embedder": ("tandem_embedders", Embedder),
}

DEFAULT_PLUGINS = (
    "tandem.plugins.samplers",
    "tandem.plugins.attention",
    "tandem.plugins.triton_attention",
    "tandem.plugins.quantizers",
    "tandem.plugins.triton_quantizers",
    "tandem.plugins.kv_cache",
    "tandem.plugins.draft",
    "tandem.plugins.embedders",
)
BUILTIN_SOURCE = "built-in"


@dataclass
class PluginInfo:
    """One plugin as `tandem plugins list` shows it."""

    name: str
    source: str  # "built-in" or "package NAME VERSION"
    loaded: bool
    error: str | None = None
    components: list[tuple[str, str]] = field(default_factory=list)  # (category, name)


class PluginManager:
    def __init__(self, load: bool = True, entry_points: bool = True, allow: list[str] | None = None):
        """allow: the entry-point plugins that may load, by name (None: every installed one)."""
        if allow is not None and not (isinstance(allow, (list, tuple, set)) and all(isinstance(n, str) for n in allow)):
            raise ConfigError(f"plugins must be a list of plugin names, got {allow!r}")
        self.allow = None if allow is None else frozenset(allow)
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._components: dict[str, dict[str, tuple[type, str]]] = {c: {} for c in CATEGORIES}
        if load:
            for module_name in DEFAULT_PLUGINS:
                self.register_module(module_name, BUILTIN_SOURCE)
            if entry_points:
                self.load_entry_points()

    # -- loading ----------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"package {dist.name} {dist.version}" if dist is not None else f"entry point {ep.value}"
            if self.allow is not None and ep.name not in self.allow:
                self.plugins[ep.name] = PluginInfo(ep.name, source, False, "not in the plugins allowlist")
                continue
            if ep.name in self.plugins:
                self._refuse(ep.name, source, f"a plugin named {ep.name!r} is already registered "
                                              f"(from {self.plugins[ep.name].source})", keep_existing=True)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self._refuse(ep.name, source, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.register(plugin, ep.name, source, strict=False)

    def register_module(self, module_name: str, source: str) -> PluginInfo:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            return self._refuse(module_name, source, f"import failed: {type(exc).__name__}: {exc}")
        return self.register(module, module_name, source, strict=False)

    def register(self, plugin: Any, name: str, source: str = "registered in code", strict: bool = True) -> PluginInfo:
        """Register a plugin object (a module or an instance with @hookimpl methods). With
        strict=True a refused plugin raises PluginError; otherwise it is recorded as not loaded."""
        if name in self.plugins:
            return self._fail(strict, name, source, f"a plugin named {name!r} is already registered "
                                                    f"(from {self.plugins[name].source})", keep_existing=True)
        try:
            self._pm.register(plugin, name)
        except Exception as exc:  # pluggy's own validation: unknown hook, bad signature, same object twice
            return self._fail(strict, name, source, f"{type(exc).__name__}: {exc}")
        try:
            found = self._collect(plugin, name)
        except PluginError as exc:
            self._pm.unregister(plugin)
            return self._fail(strict, name, source, str(exc))
        for category, cls in found:
            self._components[category][cls.name] = (cls, name)
        info = PluginInfo(name, source, True, None, [(c, cls.name) for c, cls in found])
        self.plugins[name] = info
        return info

    def _collect(self, plugin: Any, plugin_name: str) -> list[tuple[str, type]]:
        found, seen = [], set()
        for category, (hook_name, base) in CATEGORIES.items():
            impls = [i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                kwargs = {"api_version": API_VERSION}
                try:
                    classes = impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
                except Exception as exc:
                    raise PluginError(f"hook {hook_name} raised {type(exc).__name__}: {exc}") from exc
                for cls in classes or ():
                    self._check_component(category, base, cls, seen)
                    seen.add((category, cls.name))
                    found.append((category, cls))
        return found

    def _check_component(self, category: str, base: type, cls: Any, seen: set) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{category} {cls!r} is not a subclass of tandem.plugins.{base.__name__}")
        if not isinstance(cls.name, str) or not cls.name:
            raise PluginError(f"{category} {cls.__qualname__} has no name")
        if cls.api_version > API_VERSION:
            raise PluginError(f"{category} {cls.name!r} needs plugin API {cls.api_version}; "
                              f"this tandem has {API_VERSION}")
        taken = self._components[category].get(cls.name)
        if taken is not None or (category, cls.name) in seen:
            owner = taken[1] if taken else "the same plugin"
            raise PluginError(f"duplicate {category} name {cls.name!r}: already provided by {owner!r}")

    def _fail(self, strict: bool, name: str, source: str, reason: str, keep_existing: bool = False) -> PluginInfo:
        if strict:
            raise PluginError(f"plugin {name!r} ({source}) was refused: {reason}")
        return self._refuse(name, source, reason, keep_existing)

    def _refuse(self, name: str, source: str, reason: str, keep_existing: bool = False) -> PluginInfo:
        log.warning("plugin %r (%s) not loaded: %s", name, source, reason)
        info = PluginInfo(name, source, False, reason)
        if keep_existing:  # the name belongs to the plugin that got it first; list the refusal beside it
            self.plugins[f"{name} ({source})"] = info
        else:
            self.plugins[name] = info
        return info

    # -- lookup -----------------------------------------------------------------------------------
    def names(self, category: str) -> list[str]:
        return sorted(self._components[category])

    def get(self, category: str, name: str) -> type:
        if category not in CATEGORIES:
            raise ConfigError(f"unknown plugin category {category!r}; categories: {', '.join(CATEGORIES)}")
        entry = self._components[category].get(name)
        if entry is None:
            label = category.replace("_", " ")
            raise ConfigError(f"unknown {label} {name!r}; available: {', '.join(self.names(category)) or 'none'}")
        return entry[0]

    def owner(self, category: str, name: str) -> str:
        return self._components[category][name][1]

    def create(self, category: str, name: str, options: dict | None = None) -> Any:
        """Instantiate a component; its constructor validates the options (ConfigError)."""
        cls = self.get(category, name)
        try:
            return cls(**(options or {}))
        except ConfigError:
            raise
        except TypeError as exc:
            raise ConfigError(f"{category.replace('_', ' ')} {name!r}: bad options {options}: {exc}") from None
        except Exception as exc:
            raise PluginError(f"{category.replace('_', ' ')} {name!r} from plugin "
                              f"{self.owner(category, name)!r} failed to start: {type(exc).__name__}: {exc}") from exc

    def sampler_pipeline(self, vocab_size: int) -> SamplerPipeline:
        """Every registered logits processor, instantiated, in order."""
        names = self.names("logits_processor")
        processors = [self.create("logits_processor", n) for n in names]
        return SamplerPipeline(processors, vocab_size, {n: self.owner("logits_processor", n) for n in names})


_default: PluginManager | None = None


def get_plugin_manager(allow: list[str] | None = None) -> PluginManager:
    """The process's plugin manager, loaded on first use (built-ins, then entry points). allow:
    the config's `plugins:` allowlist; a service process passes it first, and a manager loaded
    under another list is replaced."""
    global _default
    wanted = None if allow is None else frozenset(allow)
    if _default is None or (allow is not None and _default.allow != wanted):
        _default = PluginManager(allow=allow)
    return _default

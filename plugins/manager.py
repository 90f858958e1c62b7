"""The plugin manager: loads the built-ins and the "tandem" entry points once, collects each
plugin's components by category, and hands out components by name (pytest's PluginManager idea:
built-ins listed in DEFAULT_PLUGINS and registered exactly like third-party plugins).

An installed plugin runs its code with the server's rights as soon as it is imported: `allow` (the
config's `plugins:` list) names the third-party plugins that may load; the others are listed as not
loaded and never imported. The built-ins (DEFAULT_PLUGINS, tandem's own code) always load.

What is refused, and how much (docs/plugins.md section 6 says the same):
- The whole plugin, when the plugin itself is broken: importing it fails, a hook raises or returns
  something other than a list, a hookimpl names a hook tandem does not have (a misspelling pluggy
  would only report in `check_pending`), a function named like a hook is not marked @hookimpl, a
  component is not a subclass of its category's base class or has no name, or a name is taken.
  It is recorded as not loaded with the reason and the components it offered (so `tandem plugins
  list` can name what was lost); nothing of it is registered; the other plugins go on.
- One component, when that component cannot be used here but the plugin is sound: it needs a
  newer plugin API than this tandem has, or it is an attention variant whose mask is not causal
  (`mask_problem`, checked when it loads and again when an engine builds it with its options).
  The rest of the plugin loads; the component is listed as refused, with why.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tandem.draft import DraftProposer
from tandem.rag.embedding import Embedder
from tandem.errors import ConfigError, PluginError
from tandem.model.attention import AttentionBackend, AttentionVariant, mask_problem
from tandem.model.kv_pool import KVCacheFormat
from tandem.model.lora import AdapterFormat
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
    "adapter_format": ("tandem_adapter_formats", AdapterFormat),
}

DEFAULT_PLUGINS = (
    "tandem.plugins.samplers",
    "tandem.plugins.structured",
    "tandem.plugins.attention",
    "tandem.plugins.triton_attention",
    "tandem.plugins.quantizers",
    "tandem.plugins.triton_quantizers",
    "tandem.plugins.kv_cache",
    "tandem.plugins.draft",
    "tandem.plugins.embedders",
    "tandem.plugins.lora",
)
BUILTIN_SOURCE = "built-in"


@dataclass
class PluginInfo:
    """One plugin as `tandem plugins list` shows it."""

    name: str
    source: str  # "built-in" or "package NAME VERSION"
    loaded: bool
    error: str | None = None
    components: list[tuple[str, str]] = field(default_factory=list)  # (category, name): registered
    # (category, name, why): not registered. For a loaded plugin, the components refused alone; for
    # one not loaded, every component it offered (why: the plugin's error).
    refused: list[tuple[str, str, str]] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """`tandem plugins list`'s rows: one per component, registered or not (none: one "-" row)."""
        status = "loaded" if self.loaded else f"not loaded: {self.error}"
        rows = [self._row(category, name, self.loaded, status) for category, name in self.components]
        rows += [self._row(category, name, False, f"refused: {why}" if self.loaded else status)
                 for category, name, why in self.refused]
        return rows or [self._row("-", "-", self.loaded, status)]

    def _row(self, category: str, name: str, loaded: bool, status: str) -> dict:
        return {"category": category, "name": name, "plugin": self.name, "source": self.source, "loaded": loaded,
                "status": status}


@dataclass
class _Offer:
    """What one plugin's hooks returned, sorted by what happens to it."""

    accepted: list[tuple[str, type]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (category, name, why): left out alone
    offered: list[tuple[str, str]] = field(default_factory=list)  # every named component, for the listing
    error: str | None = None  # the first fault that refuses the whole plugin

    def fault(self, reason: str) -> None:
        self.error = self.error or reason


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
        self._refused: dict[str, dict[str, tuple[str, str]]] = {c: {} for c in CATEGORIES}  # name -> (plugin, why)
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
        except Exception as exc:  # pluggy's own validation: bad signature, same object twice
            return self._fail(strict, name, source, f"{type(exc).__name__}: {exc}")
        offer = self._collect(plugin)
        error = self._hook_fault(plugin) or offer.error
        if error is not None:
            self._pm.unregister(plugin)
            return self._fail(strict, name, source, error, lost=offer.offered)
        for category, cls in offer.accepted:
            self._components[category][cls.name] = (cls, name)
        for category, cls_name, why in offer.refused:
            log.warning("plugin %r: %s %r refused: %s", name, category, cls_name, why)
            self._refused[category].setdefault(cls_name, (name, why))
        info = PluginInfo(name, source, True, None, [(c, cls.name) for c, cls in offer.accepted], offer.refused)
        self.plugins[name] = info
        return info

    def _hook_fault(self, plugin: Any) -> str | None:
        """A hookimpl naming no hook of tandem's (unless marked optionalhook: written for a newer
        tandem), or a function named like a hook but not marked @hookimpl: either way the plugin
        would load, as "loaded", with nothing in it."""
        specs = [n for n, caller in vars(self._pm.hook).items() if not n.startswith("_") and caller.has_spec()]
        for caller in self._pm.get_hookcallers(plugin) or ():
            impls = [i for i in caller.get_hookimpls() if i.plugin is plugin and not i.optionalhook]
            if not caller.has_spec() and impls:
                closest = difflib.get_close_matches(caller.name, specs, n=1, cutoff=0)
                return f"unknown hook {caller.name!r}: tandem has no such hook (did you mean {closest[0]!r}?)"
        for spec in specs:
            unmarked = self._pm.parse_hookimpl_opts(plugin, spec) is None
            if unmarked and callable(inspect.getattr_static(plugin, spec, None)):
                return f"{spec} is not marked @hookimpl (tandem.plugins.hookimpl), so it would never be called"
        return None

    def _collect(self, plugin: Any) -> _Offer:
        offer = _Offer()
        for category, (hook_name, base) in CATEGORIES.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                kwargs = {"api_version": API_VERSION}
                try:
                    classes = impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
                except Exception as exc:
                    offer.fault(f"hook {hook_name} raised {type(exc).__name__}: {exc}")
                    continue
                if not isinstance(classes, (list, tuple, type(None))):
                    offer.fault(f"hook {hook_name} returned {classes!r}, not a list of classes")
                    continue
                for cls in classes or ():
                    self._sort(offer, category, base, cls)
        return offer

    def _sort(self, offer: _Offer, category: str, base: type, cls: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            return offer.fault(f"{category} {cls!r} is not a subclass of tandem.plugins.{base.__name__}")
        if not isinstance(cls.name, str) or not cls.name:
            return offer.fault(f"{category} {cls.__qualname__} has no name")
        offer.offered.append((category, cls.name))
        why = self._refusal(category, cls)
        if why is not None:  # before the name check: a newer component may share its fallback's name
            offer.refused.append((category, cls.name, why))
            return None
        taken = self._components[category].get(cls.name)
        if taken is not None or any(c == category and k.name == cls.name for c, k in offer.accepted):
            owner = taken[1] if taken else "the same plugin"
            return offer.fault(f"duplicate {category} name {cls.name!r}: already provided by {owner!r}")
        offer.accepted.append((category, cls))
        return None

    @staticmethod
    def _refusal(category: str, cls: type) -> str | None:
        """Why this one component is left out while the rest of its plugin loads, or None."""
        if not isinstance(cls.api_version, int) or cls.api_version > API_VERSION:
            return f"needs plugin API {cls.api_version}; this tandem has {API_VERSION}"
        if category != "attention_variant":
            return None
        options = getattr(cls, "example_options", {})
        try:
            variant = cls(**options)
        except Exception:  # needs options to be built: checked when an engine builds it (create)
            return None
        problem = _variant_problem(variant)
        return None if problem is None else f"its mask{f' (options {options})' if options else ''} {problem}"

    def _fail(self, strict: bool, name: str, source: str, reason: str, keep_existing: bool = False,
              lost: list[tuple[str, str]] = ()) -> PluginInfo:
        if strict:
            raise PluginError(f"plugin {name!r} ({source}) was refused: {reason}")
        return self._refuse(name, source, reason, keep_existing, lost)

    def _refuse(self, name: str, source: str, reason: str, keep_existing: bool = False,
                lost: list[tuple[str, str]] = ()) -> PluginInfo:
        log.warning("plugin %r (%s) not loaded: %s", name, source, reason)
        info = PluginInfo(name, source, False, reason, [], [(category, c, reason) for category, c in lost])
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
        if entry is not None:
            return entry[0]
        label = category.replace("_", " ")
        if name in self._refused[category]:
            plugin, why = self._refused[category][name]
            raise ConfigError(f"{label} {name!r} from plugin {plugin!r} was refused: {why}")
        raise ConfigError(f"unknown {label} {name!r}; available: {', '.join(self.names(category)) or 'none'}")

    def owner(self, category: str, name: str) -> str:
        return self._components[category][name][1]

    def create(self, category: str, name: str, options: dict | None = None) -> Any:
        """Instantiate a component; its constructor validates the options (ConfigError)."""
        cls = self.get(category, name)
        try:
            component = cls(**(options or {}))
        except ConfigError:
            raise
        except TypeError as exc:
            raise ConfigError(f"{category.replace('_', ' ')} {name!r}: bad options {options}: {exc}") from None
        except Exception as exc:
            raise PluginError(f"{category.replace('_', ' ')} {name!r} from plugin "
                              f"{self.owner(category, name)!r} failed to start: {type(exc).__name__}: {exc}") from exc
        problem = _variant_problem(component) if category == "attention_variant" else None
        if problem is not None:
            raise PluginError(f"attention variant {name!r} from plugin {self.owner(category, name)!r} with options "
                              f"{options or {}}: its mask {problem}")
        return component

    def sampler_pipeline(self, vocab_size: int) -> SamplerPipeline:
        """Every registered logits processor, instantiated, in order."""
        names = self.names("logits_processor")
        processors = [self.create("logits_processor", n) for n in names]
        return SamplerPipeline(processors, vocab_size, {n: self.owner("logits_processor", n) for n in names})


def _variant_problem(variant: AttentionVariant) -> str | None:
    try:
        return mask_problem(variant)
    except Exception as exc:  # the plugin's own code
        return f"could not be checked: {type(exc).__name__}: {exc}"


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

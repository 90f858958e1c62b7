"""tandem.plugins: the plugin API. Third parties add attention variants and backends, samplers
(logits processors), weight quantizers, KV-cache formats, draft proposers, embedders and LoRA
adapter formats by
installing a package that declares an entry point in the group "tandem":

    [project.entry-points.tandem]
    my_plugin = "my_package.tandem_plugin"     # a module with @hookimpl functions

and implements hooks from `tandem.plugins.hookspecs` (`plugins/hookspecs.py` in the repository),
returning subclasses of the base classes re-exported here. The built-ins register the same way
(see `DEFAULT_PLUGINS`).

API_VERSION is this API's version. Hooks only ever gain arguments (an implementation may take
fewer than the spec offers), base classes only gain methods with defaults; a component declares
the `api_version` it was written for and is refused, by name, if it needs a newer tandem (the
rest of its plugin still loads).
`tandem.plugins.testing` checks a component against the contract.
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "tandem"
ENTRY_POINT_GROUP = "tandem"
API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

from tandem.draft import DraftProposer  # noqa: E402  (the markers above must exist before the built-ins import them)
from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant, KVRetention  # noqa: E402
from tandem.model.kv_pool import DenseKVPool, KVCacheFormat  # noqa: E402
from tandem.model.lora import AdapterFormat, LoRAAdapter  # noqa: E402
from tandem.model.quantization import Quantizer  # noqa: E402
from tandem.plugins.manager import (CATEGORIES, DEFAULT_PLUGINS, PluginInfo, PluginManager,  # noqa: E402
                                    get_plugin_manager)
from tandem.sampling import LogitsProcessor, SamplingBatch  # noqa: E402

__all__ = ["API_VERSION", "CATEGORIES", "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PROJECT_NAME", "AdapterFormat",
           "AttentionBackend",
           "AttentionMask", "AttentionVariant", "DenseKVPool", "DraftProposer", "KVCacheFormat", "KVRetention",
           "LoRAAdapter", "LogitsProcessor", "PluginInfo", "PluginManager", "Quantizer", "SamplingBatch", "get_plugin_manager",
           "hookimpl", "hookspec"]

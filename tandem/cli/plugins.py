"""`tandem plugins list`: every plugin and component the plugin manager knows, and why one did
not load."""
from __future__ import annotations

import json


def add_parsers(sub) -> None:
    plugins = sub.add_parser("plugins", help="plugin commands")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", required=True)
    listing = plugins_sub.add_parser("list", help="every plugin and component: category, source, whether it "
                                                   "loaded, or why not (a failed plugin's components are listed)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--config", default=None, help="a tandem.yaml: list what its `plugins:` allowlist loads")
    listing.add_argument("--plugin", action="append", default=None, metavar="NAME",
                         help="list what this allowlist loads (repeatable; overrides --config's)")
    listing.set_defaults(handler=cmd_plugins_list)


def cmd_plugins_list(args) -> int:
    from tandem.plugins import get_plugin_manager

    allow = args.plugin
    if allow is None and args.config:
        from tandem.services.config import PipelineConfig

        allow = PipelineConfig.load(args.config).plugins
    rows = [row for info in get_plugin_manager(allow).plugins.values() for row in info.rows()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("category", "name", "plugin", "source", "status")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths.get(c, 0)) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in columns).rstrip())
    return 0

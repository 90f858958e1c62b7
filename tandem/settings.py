"""Settings declared once: a config dataclass's field carries its help, bounds and choices.

    @dataclass
    class PipelineConfig:
        grpc_port: int = setting(50051, "the gateway's gRPC port", min=0, max=65535, group="gateway")

Everything else is derived from those fields: the checks a config runs on construction
(`check`, called from `__post_init__`; special rules stay written out there), the command-line
flags of `tandem serve` and `tandem service` (`add_flags`, then `from_flags` for the values
given), and the JSON Schema of a config (`json_schema`: helm/tandem/values.schema.json is generated
from it). Adding a setting is one field in one dataclass. The YAML key is the field's name, the
flag is the name with dashes (`--grpc-port`) unless the field says otherwise.

Types come from the annotations: str, int, float (an int is accepted), bool, dict, list[str], a
nested settings dataclass, and `X | None` (null allowed). pydantic does this too; a dataclass
helper keeps the core free of the dependency and the configs plain frozen-able dataclasses.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass
from functools import cache

from tandem.errors import ConfigError

KEY = "tandem.setting"  # the metadata key of a field's Setting
_PLURAL = {str: "strings", int: "integers", float: "numbers"}


@dataclass(frozen=True)
class Setting:
    """What a field declares beyond its name, type and default."""

    help: str
    choices: tuple | None = None
    min: float | None = None  # inclusive bounds of a number
    max: float | None = None
    gt: float | None = None  # exclusive lower bound (a positive number of seconds: gt=0)
    pattern: str | None = None  # a str must match it whole
    what: str | None = None  # how errors name an allowed value, where the derived phrase says less
    flag: str | None = None  # the command-line flag; None: --name-with-dashes; "": no flag
    metavar: str | None = None
    group: str = "settings"  # the --help section of its flag
    json: bool = False  # a dict or list flag takes one JSON value instead of repeated KEY=VALUE / items
    schema: dict | typing.Callable[[], dict] | None = None  # JSON Schema replacing the derived one


def setting(default=MISSING, help: str = "", *, repr: bool = True, **declared) -> dataclasses.Field:
    """A dataclass field with its Setting. A mutable default (a dict, a list) is copied for each
    instance, as default_factory would."""
    meta = {KEY: Setting(help, **declared)}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), repr=repr, metadata=meta)
    return dataclasses.field(default=default, repr=repr, metadata=meta)


@dataclass(frozen=True)
class Kind:
    """A field's annotation, reduced to what checks, flags and schemas need."""

    base: type  # str, int, float, bool, dict, list, or a settings dataclass
    optional: bool = False
    item: type | None = None  # list[item]


@cache
def fields(cls) -> list[tuple[dataclasses.Field, Setting, Kind]]:
    """The settings of a dataclass: its fields that declare a Setting, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata[KEY], _kind(hints[f.name])) for f in dataclasses.fields(cls) if KEY in f.metadata]


def _kind(hint) -> Kind:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if set(rest) == {int, float}:
            return Kind(float, len(rest) < len(args))
        (inner,) = rest
        return dataclasses.replace(_kind(inner), optional=len(rest) < len(args))
    origin = typing.get_origin(hint) or hint
    return Kind(origin, item=args[0] if origin is list and args else None)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


# -- checks -----------------------------------------------------------------------------------
def check(config, prefix: str = "") -> None:
    """Raises ConfigError for the first field whose value breaks its declared type, bounds,
    choices or pattern: "grpc_port must be a port number, got 70000"."""
    for f, s, kind in fields(type(config)):
        value = getattr(config, f.name)
        if not allows(value, s, kind):
            raise ConfigError(f"{prefix}{f.name} must be {describe(s, kind)}, got {value!r}")


def allows(value, s: Setting, kind: Kind) -> bool:
    if value is None:
        return kind.optional
    if s.choices is not None:
        return value in s.choices
    base = kind.base
    if base is bool:
        return isinstance(value, bool)
    if base in (int, float):
        number = (int,) if base is int else (int, float)
        return (isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
                and (s.min is None or value >= s.min) and (s.max is None or value <= s.max)
                and (s.gt is None or value > s.gt))
    if base is str:
        return isinstance(value, str) and (s.pattern is None or re.fullmatch(s.pattern, value) is not None)
    if base is list:
        return isinstance(value, list) and (kind.item is None or all(isinstance(v, kind.item) for v in value))
    return isinstance(value, base)


def describe(s: Setting, kind: Kind) -> str:
    """The allowed values in words, as the errors say them."""
    if s.what:
        phrase = s.what
    elif s.choices is not None:
        phrase = f"one of {s.choices}"
    elif kind.base in (int, float):
        phrase = _describe_number(s, "an integer" if kind.base is int else "a number")
    else:
        phrase = {bool: "true or false", str: "a string", dict: "a mapping"}.get(kind.base)
        if kind.base is str and s.pattern:
            phrase = f"a string matching {s.pattern}"
        elif kind.base is list:
            phrase = f"a list of {_PLURAL.get(kind.item, kind.item.__name__)}" if kind.item else "a list"
        elif phrase is None:
            phrase = f"a mapping of {kind.base.__name__}'s settings"
    return f"{phrase} or null" if kind.optional else phrase


def _describe_number(s: Setting, noun: str) -> str:
    if s.min is not None and s.max is not None:
        return f"{noun} in [{s.min}, {s.max}]"
    if noun == "an integer" and s.min == 1:
        return "a positive integer"
    if s.gt == 0 and s.min is None:
        return f"a positive {noun.split()[-1]}"
    bounds = [f">= {s.min}"] if s.min is not None else []
    bounds += [f"> {s.gt}"] if s.gt is not None else []
    bounds += [f"<= {s.max}"] if s.max is not None else []
    return " ".join([noun, *bounds])


# -- command-line flags -----------------------------------------------------------------------
def flag_of(f: dataclasses.Field, s: Setting, prefix: str = "") -> str:
    return s.flag if s.flag is not None else "--" + (prefix + f.name).replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls, only=None, skip=(), defaults=None, config_keys: bool = True,
              prefix: str = "") -> None:
    """One flag per setting of cls, in argument groups by Setting.group. Every default is None
    ("not given": a config file's value stands) unless `defaults` names one. A nested settings
    dataclass gets its fields' flags under its name (`--migration-max-attempts`). config_keys: the
    help names the config file's key where it is not the flag's name with underscores."""
    groups = {g.title: g for g in parser._action_groups}  # the groups earlier calls made
    for f, s, kind in fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or s.flag == "":
            continue
        if dataclasses.is_dataclass(kind.base):
            add_flags(parser, kind.base, config_keys=config_keys, prefix=f"{prefix}{f.name}_")
            continue
        group = groups.get(s.group) or groups.setdefault(s.group, parser.add_argument_group(s.group))
        default = (defaults or {}).get(f.name)
        group.add_argument(flag_of(f, s, prefix), dest=prefix + f.name, default=default,
                           help=_help(f, s, kind, prefix, default, config_keys), **_action(s, kind))


def _action(s: Setting, kind: Kind) -> dict:
    if kind.base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if s.json or dataclasses.is_dataclass(kind.base):
        return {"metavar": s.metavar or "JSON"}
    if kind.base is dict:
        return {"action": "append", "metavar": s.metavar or "KEY=VALUE"}
    if kind.base is list:
        return {"action": "append", "metavar": s.metavar or "NAME"}
    return {"type": kind.base, "choices": s.choices, "metavar": s.metavar}


def _help(f: dataclasses.Field, s: Setting, kind: Kind, prefix: str, default, config_keys: bool) -> str:
    text = s.help
    if kind.base in (dict, list) and not s.json:
        text += " (repeatable)"
    shown = default if default is not None else default_of(f)
    if shown not in (None, {}, []):
        text += f" (default: {json.dumps(shown) if isinstance(shown, (dict, list)) else shown})"
    if config_keys and (prefix or flag_of(f, s, prefix) != "--" + f.name.replace("_", "-")):
        text += f" [config: {f'{prefix[:-1]}.{f.name}' if prefix else f.name}]"
    return text.replace("%", "%%")  # argparse formats help with %


def from_flags(args: argparse.Namespace, cls, only=None, prefix: str = "") -> dict:
    """The settings given on the command line (of those in `only`), by field name: KEY=VALUE pairs become a dict
    (values parsed as JSON where they parse), JSON flags are parsed ("none", "null", "off": null),
    a nested dataclass's flags a dict of its given fields. Flags not given are left out."""
    given = {}
    for f, s, kind in fields(cls):
        if s.flag == "" or (only is not None and f.name not in only):
            continue
        if dataclasses.is_dataclass(kind.base) and not s.json:
            nested = from_flags(args, kind.base, prefix=f"{prefix}{f.name}_")
            if nested:
                given[f.name] = nested
            continue
        raw = getattr(args, prefix + f.name, None)
        if raw is None:  # not given, or not a flag of this command
            continue
        flag = flag_of(f, s, prefix)
        if s.json:
            given[f.name] = parse_json(raw, flag)
        elif kind.base is dict:
            given[f.name] = parse_options(raw, flag)
        else:
            given[f.name] = raw
    return given


def parse_options(items: list[str], flag: str) -> dict:
    """KEY=VALUE pairs; values are JSON where they parse (numbers, true/false), else strings."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_json(raw: str, flag: str):
    """A flag's JSON value; "none", "null" and "off" are null."""
    if raw.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not JSON ({exc})") from None


# -- JSON Schema ------------------------------------------------------------------------------
def json_schema(cls) -> dict:
    """The JSON Schema of a mapping of cls's settings (draft 2020-12 keywords that Helm's
    validator knows): types, enums, bounds, patterns, and each field's help as its description."""
    return {"type": "object", "properties": {f.name: field_schema(f, s, kind) for f, s, kind in fields(cls)},
            "additionalProperties": False}


def field_schema(f: dataclasses.Field, s: Setting, kind: Kind) -> dict:
    described = {"description": s.help}
    if s.schema is not None:
        return {**described, **(s.schema() if callable(s.schema) else s.schema)}
    if s.choices is not None:
        return {**described, "enum": [*s.choices, *([None] if kind.optional else [])]}
    if dataclasses.is_dataclass(kind.base):
        return {**described, **json_schema(kind.base)}
    name = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
    schema = {**described, "type": [name[kind.base], "null"] if kind.optional else name[kind.base]}
    if kind.item is not None:
        schema["items"] = {"type": name[kind.item]}
    for key, value in (("minimum", s.min), ("maximum", s.max), ("exclusiveMinimum", s.gt)):
        if value is not None:
            schema[key] = value
    if s.pattern is not None:
        schema["pattern"] = f"^({s.pattern})$"
    return schema

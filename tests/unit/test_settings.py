"""Settings declared once (tandem.settings): the checks, flags and schema a field's declaration
makes, and the places that still spell settings out themselves (tandem.LLM's signature,
PipelineConfig.llm_kwargs, EngineConfig, the `generate` flags, docs/serving.md's tandem.yaml) checked against
the declarations."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem import settings
from tandem.cli import build_parser
from tandem.engine.config import EngineConfig
from tandem.errors import ConfigError
from tandem.llm import LLM
from tandem.services.config import ENGINE_KEYS, MigrationConfig, PipelineConfig
from tandem.settings import setting

ROOT = Path(__file__).resolve().parents[2]


# -- the helper, on a small config --------------------------------------------------------------
@dataclass
class Inner:
    retries: int = setting(3, "retries", min=0)

    def __post_init__(self):
        settings.check(self, "inner.")


@dataclass
class Example:
    name: str = setting("a", "a name", choices=("a", "b"))
    port: int = setting(80, "a port", min=0, max=65535, what="a port number")
    wait_s: float | None = setting(1.5, "seconds", gt=0, metavar="SECONDS")
    on: bool = setting(True, "a switch")
    options: dict = setting({}, "an option", flag="--option")
    names: list[str] | None = setting(None, "a name", flag="--name-of")
    spec: dict | None = setting(None, "JSON", json=True)
    device: str = setting("cpu", "a device", pattern=r"cpu|cuda(:[0-9]+)?")
    inner: Inner = setting(Inner(), "nested")
    secret: str | None = setting(None, "never a flag", flag="")

    def __post_init__(self):
        if isinstance(self.inner, dict):
            self.inner = Inner(**self.inner)
        settings.check(self)


@pytest.mark.parametrize("values, message", [
    ({"name": "c"}, "name must be one of ('a', 'b'), got 'c'"),
    ({"port": 70000}, "port must be a port number, got 70000"),
    ({"port": True}, "port must be a port number, got True"),
    ({"wait_s": 0}, "wait_s must be a positive number or null, got 0"),
    ({"wait_s": float("nan")}, "wait_s must be a positive number or null"),
    ({"on": 1}, "on must be true or false, got 1"),
    ({"options": []}, "options must be a mapping, got []"),
    ({"names": ["x", 1]}, "names must be a list of strings or null"),
    ({"device": "gpu"}, "device must be a string matching"),
    ({"inner": {"retries": -1}}, "inner.retries must be an integer >= 0, got -1"),
])
def test_declared_checks_say_what_is_allowed(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Example(**values)


def test_good_values_pass_and_mutable_defaults_are_not_shared():
    a, b = Example(wait_s=None, port=0), Example()
    a.options["k"] = 1
    assert b.options == {} and a.inner is not b.inner
    assert Example(wait_s=2).wait_s == 2  # an int is a number


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, Example)
    return settings.from_flags(parser.parse_args(argv), Example)


def test_flags_come_from_the_fields():
    assert parse() == {}  # nothing given: nothing overrides a config file
    given = parse("--name", "b", "--port", "8", "--wait-s", "0.5", "--no-on", "--option", "x=1", "--option", "y=z",
                  "--name-of", "p", "--name-of", "q", "--spec", '{"k": 5}', "--inner-retries", "7")
    assert given == {"name": "b", "port": 8, "wait_s": 0.5, "on": False, "options": {"x": 1, "y": "z"},
                     "names": ["p", "q"], "spec": {"k": 5}, "inner": {"retries": 7}}
    assert parse("--spec", "none") == {"spec": None}  # an explicit null
    with pytest.raises(SystemExit):
        parse("--secret", "x")
    with pytest.raises(SystemExit):
        parse("--name", "c")  # choices are argparse's too
    with pytest.raises(ValueError, match="--option takes KEY=VALUE"):
        parse("--option", "novalue")


def test_help_shows_the_declared_help_default_and_config_key():
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "a port (default: 80)" in text and "an option (repeatable) [config: options]" in text
    assert "retries (default: 3) [config: inner.retries]" in text


def test_json_schema_of_the_fields():
    schema = settings.json_schema(Example)
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    assert props["name"] == {"description": "a name", "enum": ["a", "b"]}
    assert props["port"] == {"description": "a port", "type": "integer", "minimum": 0, "maximum": 65535}
    assert props["wait_s"]["type"] == ["number", "null"] and props["wait_s"]["exclusiveMinimum"] == 0
    assert props["names"]["items"] == {"type": "string"}
    assert props["device"]["pattern"] == "^(cpu|cuda(:[0-9]+)?)$"
    assert props["inner"]["properties"]["retries"]["minimum"] == 0


# -- every setting is declared, and has a flag -------------------------------------------------
NO_FLAG = {"internal_token"}  # a secret: a command line is visible to every local user


@pytest.mark.parametrize("cls", [PipelineConfig, MigrationConfig, EngineConfig])
def test_every_field_is_a_declared_setting(cls):
    undeclared = [f.name for f in dataclasses.fields(cls) if settings.KEY not in f.metadata]
    assert not undeclared, f"declare these with tandem.settings.setting(...): {undeclared}"
    assert all(s.help for _, s, _ in settings.fields(cls))


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


def test_serve_has_a_flag_for_every_setting_and_service_all_but_rays():
    names = {f.name for f in dataclasses.fields(PipelineConfig)} - NO_FLAG - {"migration"}
    names |= {f"migration_{f.name}" for f in dataclasses.fields(MigrationConfig)}
    assert names <= dests(subcommand("serve"))
    ray = {f.name for f, s, _ in settings.fields(PipelineConfig) if s.group == "ray"}
    assert ray == {"replicas", "ray_address", "dashboard", "object_store_memory", "gateway_resources"}
    assert names - ray <= dests(subcommand("service")) and not ray & dests(subcommand("service"))


def test_serve_flags_reach_the_config(tmp_path):
    path = tmp_path / "tandem.yaml"
    path.write_text("migration: {max_attempts: 5}\nspeculative: {method: ngram, k: 4}\nrag_hybrid: true\n")
    args = build_parser().parse_args(["serve", "--config", str(path), "--migration-stall-timeout-s", "9",
                                      "--speculative", "none", "--no-rag-hybrid", "--engine", "block_size=32",
                                      "--threads", "3", "--plugin", "a", "--dashboard"])
    from tandem.cli import pipeline_config

    config = pipeline_config(args)
    assert (config.migration.max_attempts, config.migration.stall_timeout_s) == (5, 9)  # merged with the file's
    assert config.speculative is None and config.rag_hybrid is False  # explicit off beats the file
    assert config.engine == {"block_size": 32} and config.num_threads == 3 and config.plugins == ["a"]
    assert config.dashboard is True


# -- tandem.LLM, PipelineConfig.llm_kwargs and EngineConfig agree ---------------------------------
LLM_ONLY = {"progress"}  # a terminal's progress bar: a worker never shows one (llm_kwargs sets False)
# Where a pipeline worker's default differs from the library's, and why.
PIPELINE_DEFAULTS = {
    "device": "auto",  # a worker takes the GPU Ray gave it; in-process, the CPU unless asked
    "kv_cache_memory": 512 << 20,  # a worker shares its node with others: 512 MiB, not EngineConfig's 2 GiB
}
NOT_FOR_PIPELINES = {"num_kv_blocks"}  # a worker sizes its pool from kv_cache_memory


def llm_parameters() -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(LLM.__init__).parameters)
    params.pop("self"), params.pop("engine_options")
    return params


def kind_of(hint) -> settings.Kind:
    kind = settings._kind(hint)
    return dataclasses.replace(kind, optional=False)


def test_llm_kwargs_set_every_llm_argument_a_pipeline_can():
    kwargs = PipelineConfig().llm_kwargs()
    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(kwargs) - set(llm_parameters()) <= engine
    assert set(llm_parameters()) - set(kwargs) <= LLM_ONLY, "a new LLM argument needs a PipelineConfig setting"
    assert set(ENGINE_KEYS) <= engine
    assert engine - set(ENGINE_KEYS) - NOT_FOR_PIPELINES == {"kv_cache_memory"}  # a setting of its own
    assert set(PipelineConfig(engine={"block_size": 32}).llm_kwargs()) - set(kwargs) == {"block_size"}


def test_llm_arguments_and_pipeline_settings_agree_in_name_default_and_type():
    pipeline = {f.name: (f, kind) for f, _, kind in settings.fields(PipelineConfig)}
    hints = typing.get_type_hints(LLM.__init__)
    engine = {f.name: (f, kind) for f, _, kind in settings.fields(EngineConfig)}
    for name, param in llm_parameters().items():
        if name in LLM_ONLY:
            continue
        field, kind = pipeline[name]
        default = PIPELINE_DEFAULTS.get(name, param.default)
        assert settings.default_of(field) in (default, {} if default is None else default), name  # {} = None
        if name in hints:
            assert kind_of(hints[name]).base is kind.base, name
    field, kind = pipeline["kv_cache_memory"]  # an LLM engine option, as are ENGINE_KEYS
    assert settings.default_of(field) == PIPELINE_DEFAULTS["kv_cache_memory"] != engine["kv_cache_memory"][0].default
    assert kind.base is int and engine["kv_cache_memory"][1].base is float  # a worker's is bytes, not a fraction


def test_generate_flags_default_to_the_library_defaults():
    from tandem.cli.generate import LIBRARY_DEFAULTS, MODEL_SETTINGS

    args = build_parser().parse_args(["generate", "hi"])
    params = llm_parameters()
    assert set(MODEL_SETTINGS) <= set(params)
    for name in MODEL_SETTINGS:
        expected = params[name].default
        given = settings.from_flags(args, PipelineConfig, only=MODEL_SETTINGS).get(name, expected)
        assert given == expected, name
    assert LIBRARY_DEFAULTS == {k: params[k].default for k in LIBRARY_DEFAULTS}
    assert set(LIBRARY_DEFAULTS) == set(PIPELINE_DEFAULTS) & set(MODEL_SETTINGS)


# -- the docs ------------------------------------------------------------------------------------
def serving_example() -> str:
    text = (ROOT / "docs" / "serving.md").read_text()
    return re.search(r"### Configuration\n\n```yaml\n(.*?)```", text, re.S).group(1)


def test_the_documented_tandem_yaml_loads_and_names_every_setting(tmp_path):
    example = serving_example()
    path = tmp_path / "tandem.yaml"
    path.write_text(example)
    PipelineConfig.load(path)
    documented = set(re.findall(r"\w+", example))
    security = set(re.findall(r"\w+", (ROOT / "docs" / "security.md").read_text()))
    credentials = {f.name for f, s, _ in settings.fields(PipelineConfig) if s.group == "credentials"}
    missing = {f.name for f in dataclasses.fields(PipelineConfig)} - documented - (credentials & security)
    assert not missing, f"docs/serving.md's tandem.yaml does not mention {sorted(missing)}"

"""The third-party example package (examples/tandem-plugin-example): installed into the
environment, found through its "tandem" entry point, passing tandem.plugins.testing, and used by
name in a generation, a CLI listing included."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tandem
from tandem.plugins import PluginManager
from tandem.plugins.testing import check_plugin

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "tandem-plugin-example"


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    try:
        importlib.metadata.distribution("tandem-plugin-example")
    except importlib.metadata.PackageNotFoundError:  # make test installs it; install it here otherwise
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "-e", str(EXAMPLE)], check=True)
        importlib.invalidate_caches()
        sys.path.append(str(EXAMPLE / "src"))  # the editable install's .pth is only read at start-up
    return PluginManager()  # a fresh manager reads the entry points now


def test_found_through_its_entry_point(manager):
    info = manager.plugins["example"]
    assert info.loaded and info.source == "package tandem-plugin-example 0.1.0"
    assert sorted(info.components) == [("attention_variant", "chunked"), ("logits_processor", "typical_p"),
                                       ("quantizer", "int8_tensor")]


def test_passes_the_compatibility_suite(manager):
    assert len(check_plugin("example", manager)) == 3


def test_used_by_name_in_a_generation(manager, tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64, plugins=manager,
                     quantization="int8_tensor", attention="chunked", attention_options={"chunk": 8})
    params = tandem.SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True,
                                   logits_processors={"typical_p": {"mass": 0.5}})
    first = llm.generate([3, 4, 5, 6], params)[0]
    assert len(first.token_ids) == 24 and llm.generate([3, 4, 5, 6], params)[0].token_ids == first.token_ids
    assert llm.engine.stats()["kv_blocks_used"] == 0
    with pytest.raises(tandem.InvalidRequestError, match="mass must be a number in"):
        llm.generate([3], tandem.SamplingParams(logits_processors={"typical_p": {"mass": 2}}))


def test_cli_lists_it(manager):
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "plugins", "list"], capture_output=True, text=True,
                         check=True).stdout
    assert "typical_p" in out and "package tandem-plugin-example 0.1.0" in out and "built-in" in out


def test_cli_lists_what_an_allowlist_loads(tmp_path):
    config = tmp_path / "tandem.yaml"
    config.write_text("plugins: [someone-else]\n")
    for flags in (["--config", str(config)], ["--plugin", "someone-else"]):
        out = subprocess.run([sys.executable, "-m", "tandem.cli", "plugins", "list", "--json", *flags],
                             capture_output=True, text=True, check=True).stdout
        rows = {r["plugin"]: r for r in json.loads(out)}
        assert rows["example"]["status"] == "not loaded: not in the plugins allowlist", flags
        assert any(r["loaded"] and r["source"] == "built-in" for r in rows.values())  # built-ins always load

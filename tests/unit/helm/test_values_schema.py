"""The `config` section of helm/tandem/values.schema.json is generated from PipelineConfig's
fields (helm/generate_schema.py, `make schema`): this fails when the committed file is stale, as
tests/unit/services/test_protos.py does for the generated protobuf code."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_schema", ROOT / "helm" / "generate_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_schema_is_fresh():
    generator = load_generator()
    assert generator.SCHEMA.read_text() == generator.generate(), \
        "helm/tandem/values.schema.json is stale: run `make schema`"


def test_config_section_covers_every_setting_the_chart_does_not_own():
    from tandem.services.config import PipelineConfig

    generator = load_generator()
    config = json.loads(generator.SCHEMA.read_text())["properties"]["config"]["properties"]
    extra = config["extraConfig"]
    settings = set(PipelineConfig.__dataclass_fields__)
    assert set(extra["propertyNames"]["enum"]) == set(extra["properties"]) == settings - set(generator.owned_keys())
    assert "internal_token" in generator.owned_keys()  # never in the ConfigMap
    assert config["mode"]["enum"] == ["auto", "disaggregated", "aggregated"]
    assert config["replicas"]["properties"]["decode"] == {"type": "integer", "minimum": 1}

"""Generate the `config` section of helm/tandem/values.schema.json from PipelineConfig's fields.

    python helm/generate_schema.py        # or: make schema

The chart passes `config` through as tandem.yaml (templates/_helpers.tpl, "tandem.config"). The
keys values.yaml lists under `config` get their schema there; every other setting tandem has, but
those the chart sets itself ("tandem.ownedConfigKeys" in _helpers.tpl), may go under
`config.extraConfig` and is checked there too. Types, enums, bounds, patterns and descriptions
come from the fields' declarations (tandem.settings.json_schema); the rest of the file is written
by hand. tests/unit/helm/test_values_schema.py fails when the committed file is stale.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "tandem"
SCHEMA = CHART / "values.schema.json"
REQUIRED = ["mode", "replicas"]  # the templates read them


def owned_keys() -> list[str]:
    """The settings the chart sets itself, from the "tandem.ownedConfigKeys" template."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    match = re.search(r'define "tandem.ownedConfigKeys" -}}\s*(.*?)\s*{{- end', helpers, re.S)
    return match.group(1).split()


def config_schema() -> dict:
    from tandem.services.config import PipelineConfig
    from tandem.settings import json_schema

    fields = json_schema(PipelineConfig)["properties"]
    listed = [key for key in yaml.safe_load((CHART / "values.yaml").read_text())["config"] if key != "extraConfig"]
    owned = owned_keys()
    extra = sorted(set(fields) - set(owned))
    return {
        "type": "object",
        "description": "tandem.yaml settings, under tandem's own key names (generated from PipelineConfig: "
                       "make schema)",
        "properties": {
            **{key: fields[key] for key in listed},
            "extraConfig": {
                "type": "object",
                "description": f"More tandem.yaml keys; not the ones the chart sets ({', '.join(owned)})",
                "propertyNames": {"enum": extra},
                "properties": {key: fields[key] for key in extra},
            },
        },
        "required": REQUIRED,
        "additionalProperties": False,
    }


def generate() -> str:
    """values.schema.json with its `config` section generated."""
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["config"] = config_schema()
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(generate())
    print(SCHEMA, file=sys.stderr)

"""The committed generated code of protos/tandem/v1 is what grpcio-tools makes of the .proto files
now: editing a .proto without `make protos` fails here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in (ROOT / "tandem" / "v1").glob("*_pb2*.py*")}
    assert len(fresh) == 3 * len(list((ROOT / "protos" / "tandem" / "v1").glob("*.proto")))
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"stale generated code, run `make protos`: {stale}"


def test_every_service_has_its_proto():
    names = {p.stem for p in (ROOT / "protos" / "tandem" / "v1").glob("*.proto")}
    assert names == {"common", "gateway", "tokenizer", "prefill", "decode", "kvstore", "draft", "retrieval"}

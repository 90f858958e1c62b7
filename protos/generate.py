"""Generate the Python code of protos/tandem/v1 into tandem/v1 (or OUT_DIR/tandem/v1).

    python protos/generate.py [OUT_DIR]

The generated modules are committed; tests/unit/services/test_protos.py regenerates them into a
temporary directory and fails when the committed ones are stale. Run `make protos` after editing
a .proto file.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time tool (grpcio-tools), not needed at run time

    import grpc_tools

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "tandem" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "tandem" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent
    for path in generate(root):
        print(path)

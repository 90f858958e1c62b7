"""Generated protobuf and gRPC modules of protos/tandem/v1 (package tandem.v1): do not edit.

Regenerate with `make protos` (python protos/generate.py) after changing a .proto file; a unit
test fails while these are stale.
"""

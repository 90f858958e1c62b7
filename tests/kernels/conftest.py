"""Kernel tests: every Triton wrapper called directly and compared with its torch reference.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports tandem.kernels); with TANDEM_TEST_GPU=1 the same tests
compile the kernels and run them on CUDA tensors.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # Triton ships for Linux only (pyproject's marker)
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels' inputs live: CUDA under TANDEM_TEST_GPU, else the CPU (interpreted)."""
    if os.environ.get("TANDEM_TEST_GPU"):
        return torch.device("cuda")
    from tandem.kernels._utils import is_interpreting

    assert is_interpreting(), "TRITON_INTERPRET must be set before tandem.kernels is imported"
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same inputs on every run."""
    torch.manual_seed(0)


# -- compiling for a GPU without one ----------------------------------------------------------------
# The interpreter runs a kernel's Python, not Triton's compiler: code it accepts can still fail to
# compile (types of loop-carried values, unsupported ops) or need more shared memory than the GPU
# has. Triton ships ptxas, so kernels compile to a cubin here, with no GPU. It runs in a fresh
# process because this one decorated the kernels for the interpreter.
_COMPILE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
args = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(args["module"]), args["kernel"])
constexprs = args["constexprs"]
signature = {name: "constexpr" if name in constexprs else args["types"].get(name, "i32") for name in fn.arg_names}
source = ASTSource(fn=fn, signature=signature,
                   constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", args["capability"], 32), options=args["options"])
print(json.dumps({"shared": compiled.metadata.shared}))
"""
HOPPER_SHARED_MEMORY = 227 * 1024  # per block, sm_90


def compile_for_gpu(module: str, kernel: str, types: dict[str, str], constexprs: dict, capability: int = 90,
                    **options) -> int:
    """Compile module.kernel for an NVIDIA GPU of `capability` (90: H100); types: Triton type names
    ("*bf16", "fp32") of the non-int32 arguments. Returns the shared memory it needs, in bytes."""
    if not (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = dict(module=module, kernel=kernel, types=types, constexprs=constexprs, capability=capability,
                options=options)
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["shared"]

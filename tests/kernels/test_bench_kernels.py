"""bench/kernels.py end to end in --smoke mode: tiny shapes on the CPU through Triton's
interpreter; the JSON report holds every kernel family, its baseline and the targets."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"

def _load_bench(monkeypatch):
    """bench/ is scripts, not a package: load the file as a module (registered: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", module)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_a_complete_report(tmp_path, capsys, monkeypatch):
    bench = _load_bench(monkeypatch)
    out = tmp_path / "kernels.json"
    bench.main(["--smoke", "--tune-gemv", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["torch"] and report["triton"] and report["device"]
    kernels = {r["kernel"] for r in report["results"]}
    expected = {"rms_norm", "rms_norm + residual", "rotary_embedding", "silu_and_mul",
                "int4 gemv", "int8 gemv", "int4 gemm", "int8 gemm", "flash_attention", "paged_attention_decode"}
    assert report["skipped"] == {}
    assert expected <= kernels
    for r in report["results"]:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and math.isfinite(r["ratio"]) and r["metric"] in ("GB/s", "TFLOP/s")
        assert r["baseline"].startswith("torch")
    # the issue's targets are listed; tiny shapes do not measure them
    assert [t["status"] for t in report["targets"]] == ["not measured"] * 4
    assert {(row["block_n"], row["split_k"]) for row in report["gemv_sweep"]} == {(4, 1), (4, 2)}
    assert "int4 gemv" in capsys.readouterr().out  # the table was printed


def test_targets_pass_and_fail_on_what_the_issue_names(monkeypatch):
    bench = _load_bench(monkeypatch)
    (flash, _), (paged, _), (gemv, _), _ = bench.TARGETS.items()

    def result(key, ratio, value=0.0):
        return bench.Result(key[0], key[1], 1.0, "GB/s", value, "torch", ratio, 0.0, ratio)

    peak = 3.35e12  # H100 SXM
    report = bench.check_targets([result(flash, 0.85), result(paged, 1.0, value=2100.0), result(gemv, 2.4)], peak)
    assert [t["status"] for t in report] == ["pass", "pass", "fail", "not measured"]
    assert report[1]["value"] == pytest.approx(2100e9 / peak)
    report = bench.check_targets([result(flash, 0.79), result(paged, 9.0, value=1900.0)], peak)
    assert [t["status"] for t in report[:2]] == ["fail", "fail"]  # 1.9 TB/s is 57% of 3.35


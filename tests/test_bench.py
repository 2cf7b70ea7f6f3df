"""The GPU benchmark's CPU smoke mode and the adapter-load, sampler and detokenize benchmarks
run end to end, so the scripts a lent GPU session depends on cannot rot unnoticed. Their
timings mean nothing here; what is checked is that every section ran and that kernels (and
texts) agreed with their references."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import PROJECT


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAPLEX_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=PROJECT, env=env
    )


def test_gpu_benchmark_runs_every_section_in_tiny_mode(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "tiny.json"
    result = _run(
        "bench/gpu_throughput.py",
        "--tiny",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"kernels", "matmul", "tune", "serve", "decode", "load", "peft"} <= set(results)
    for name, row in results["kernels"].items():
        assert row["relative_error"] < 1e-4, name
    for batch, row in results["matmul"].items():
        assert row["relative_error"] < 1e-4, batch
    assert results["peft"]["ratio"] > 0  # peft ran on the same requests


def test_adapter_load_benchmark_fills_the_slot_alike_both_ways(tmp_path):
    result = _run(
        "bench/adapter_load.py", "--shape", "smollm2-135m", "--repeats", "1", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "slot layout" in result.stdout and "x" in result.stdout.split(":")[-1]


def test_sampler_benchmark_times_every_setting_both_ways(tmp_path):
    result = _run("bench/sampler.py", "--rows", "4", "--repeats", "1", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("   4  ")]
    assert len(rows) == 4  # temperature only, two nuclei, top-k
    assert all(row[-1] == "-" or row[-1].endswith("32") for row in rows)  # 4 rows x 8 steps


def test_detokenize_benchmark_gets_the_same_text_both_ways(tmp_path):
    result = _run("bench/detokenize.py", "--lengths", "16", "100", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # it asserts the texts are equal
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["16", "100"]

"""The GPU session script in its CPU smoke mode and the adapter-load, sampler and detokenize
benchmarks run end to end, so the scripts a lent GPU session depends on cannot rot unnoticed.
Their timings mean nothing here; what is checked is that every section ran and that kernels
(and texts) agreed with their references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT

SESSION_FILES = ("model", "kernels", "tune")  # the JSON the session script writes


def _env(tmp_path, extra=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAPLEX_HOME"] = str(tmp_path / "home")
    # the session script calls python3: this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env | (extra or {})


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=PROJECT, env=_env(tmp_path)
    )


def _run_shell(*args: str, tmp_path, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, cwd=PROJECT, env=_env(tmp_path, env)
    )


def test_gpu_session_runs_every_benchmark_section_in_tiny_mode(tmp_path):
    """bench/gpu_session.sh as a lent GPU runs it, on tiny shapes: every stage within its
    budget, each JSON written, the kernels agreeing with their references."""
    pytest.importorskip("triton")
    out = tmp_path / "out"
    # 600 s: a margin for a slow machine (the stages end when done, not at the budget)
    env = {"TINY": "1", "OUT": str(out), "WORKDIR": str(tmp_path / "work"), "BUDGET": "600"}
    result = _run_shell("bench/gpu_session.sh", tmp_path=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "failed: none" in result.stdout
    model, kernels, tune = (json.loads((out / f"{n}.json").read_text()) for n in SESSION_FILES)
    assert {"decode", "load", "serve", "peft"} <= set(model["section_seconds"])
    assert model["decode"]["graphs_step_ms"] > 0  # the padded graph path ran too
    assert model["decode"]["graphs_outputs_after_step_ms"] > 0  # and without the overlap
    assert model["peft"]["ratio"] > 0  # peft ran on the same requests
    assert model["section_seconds"]["engine_warmup"] > 0  # the kernels compiled at start
    # 12 adapters over 2 of the 8 slots: the run took the fewer slots (more evictions)
    serve = model["serve"]
    few, every = serve["adapters_2_slots"]["stats"], serve["adapters"]["stats"]
    assert few["adapter_slot_evictions"] > every["adapter_slot_evictions"]
    assert serve["adapters_2_slots_vs_none"] > 0
    # each timed run computes its prompts: none finds a prefix an earlier run cached
    runs = {label: run for label, run in serve.items() if isinstance(run, dict)}
    assert len(runs) == 3 and all(r["stats"]["prefix_cache_hit_blocks"] == 0 for r in runs.values())
    assert all(0 < r["ttft_admitted_ms"]["50"] <= r["ttft_ms"]["50"] for r in runs.values())
    load = model["load"]
    assert load["pairs"] >= 1 and len(load["control_steps_ms"]) == load["pairs"]
    assert load["control_step_ms"] > 0  # the load step's cost is against a control
    assert load["copy_in_step_device_ms"] > 0 and load["slot_bytes"] > 0
    # both sides counted the same useful tokens; the stage's cap left peft its whole run
    peft = model["peft"]
    assert peft["peft_tokens"] == peft["loraplex_tokens"] and not peft["peft_cut"]
    assert 0 < model["decode"]["floor_double_quant_ms"] <= model["decode"]["floor_ms"]
    for name, row in kernels["kernels"].items():
        assert row["relative_error"] < 1e-4, name
    for batch, row in kernels["matmul"].items():
        assert row["relative_error"] < 1e-4, batch
    assert {"qkv/1", "down/8", "attention/decode", "lora_qkv/4"} <= set(tune["tune"])
    assert (out / "session.log").read_text().count("== ") >= 9


def test_gpu_session_skips_a_stage_the_budget_has_no_room_for(tmp_path):
    env = {"TINY": "1", "OUT": str(tmp_path), "BUDGET": "5"}
    result = _run_shell("bench/gpu_session.sh", "kernels", tmp_path=tmp_path, env=env)
    assert "== kernels: skipped" in result.stdout
    assert not (tmp_path / "kernels.json").exists()


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


def test_peft_baseline_cut_at_its_deadline_counts_only_the_steps_it_reached(tiny_base, tmp_path):
    """A lent GPU's stage has a cap: peft's generate stops at the deadline, and its useful
    tokens are those of the steps it reached, marked as cut (whole here without one)."""
    import time

    from bench.throughput import run_peft
    from tests.helpers import make_adapter

    folders = [make_adapter(tiny_base, tmp_path / f"a{i}", name=f"a{i}", seed=i) for i in (0, 1)]
    prompts, lengths = [[1, 5, 6, 7], [1, 8, 9]], [6, 9]
    args = (tiny_base.path, folders, prompts, lengths, [0, 1], None)
    whole = run_peft(*args, batch=2)
    assert (whole["tokens"], whole["cut"]) == (15, False)
    late = run_peft(*args, batch=2, deadline=time.perf_counter())  # past before it starts
    assert (late["tokens"], late["cut"]) == (0, True)

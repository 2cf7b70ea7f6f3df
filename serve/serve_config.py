"""The typed server config: `loraplex serve configs/serve/X.yaml [--host H] [--port P] ...`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from registry.base_model import DEFAULT_BASE_MODEL
from registry.config_file import (
    AdapterName,
    Number,
    StrictConfig,
    format_errors,
    read_config,
    relative_to_file,
)
from registry.errors import ConfigError
from registry.home import Home
from registry.resolve import names_registry
from serve.config import EngineConfig

# Set at the top level of the serve config, so they are refused inside `engine:`.
_TOP_LEVEL = ("base_model", "quantization", "tracking_uri")


class ApiKey(StrictConfig):
    """One client key. The key itself is never stored: its SHA-256, or the variable holding it."""

    id: str = Field(min_length=1, max_length=100)  # what the audit log and metrics call it
    sha256: str | None = None  # hex digest of the key (`printf %s KEY | sha256sum`)
    env: str | None = None  # or: the environment variable that holds the key
    adapters: list[str] = Field(default_factory=lambda: ["*"])  # `model` values allowed; * = all
    tokens_per_minute: StrictInt | None = Field(None, ge=1)  # prompt + completion; None: no cap
    admin: StrictBool = False  # may load and unload adapters (POST/DELETE /v1/adapters)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and re.fullmatch(r"[0-9a-fA-F]{64}", value) is None:
            raise ValueError("must be the 64 hex digits of the key's SHA-256")
        return None if value is None else value.lower()

    @field_validator("adapters")
    @classmethod
    def _whole_star(cls, adapters: list[str]) -> list[str]:
        # Entries are matched whole: `team-*` would silently allow nothing.
        for entry in adapters:
            if "*" in entry and entry != "*":
                raise ValueError(
                    f"{entry!r}: entries are model values or adapter names, matched whole; "
                    "'*' alone allows every model"
                )
        return adapters

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.sha256 is None) == (self.env is None):
            raise ValueError(f"key {self.id!r}: give exactly one of sha256 or env")
        return self


class AuditConfig(StrictConfig):
    path: Path | None = None  # JSON lines, one per request; None: LORAPLEX_HOME/audit.jsonl
    include_prompts: StrictBool = False  # prompt text in the log (it may hold personal data)


class ServeConfig(StrictConfig):
    base_model: str = DEFAULT_BASE_MODEL  # embedded name or a Hugging Face folder
    quantization: Literal["nf4", "fp4", "none"] = "nf4"  # as the adapters were trained
    tracking_uri: str | None = None  # registry of adapter references (default: embedded)
    host: str = "127.0.0.1"
    port: StrictInt = Field(8000, ge=1, le=65535)
    adapters: dict[AdapterName, str] = Field(default_factory=dict)  # name -> REF or folder
    # A folder of adapter folders: a request whose `model` is one's name loads it on first
    # use, as a registry reference loads (a name both there and registered is the folder's)
    adapter_dir: Path | None = None
    # For requests that do not say; null: the room the context leaves (vLLM's default)
    default_max_tokens: StrictInt | None = Field(256, ge=1)
    max_waiting: StrictInt = Field(256, ge=1)  # queued requests beyond which new ones get 503
    request_timeout_s: Number = Field(300, gt=0)  # a request still running then is aborted
    # On SIGTERM or Ctrl-C, what requests in flight get to finish before they are cut (below
    # the 30 s a container runtime usually waits before it kills the process)
    shutdown_timeout_s: Number = Field(20, gt=0)
    alias_poll_interval_s: Number = Field(10, gt=0)  # how soon a moved alias is followed
    # A reference loaded on first use is unloaded once no request named it this long (null:
    # never): each distinct one asked for would otherwise stay loaded and followed for good.
    first_use_idle_s: Number | None = Field(3600, gt=0)
    engine: EngineConfig = EngineConfig()
    api_keys: list[ApiKey] = Field(default_factory=list)  # empty: no keys asked
    audit: AuditConfig = AuditConfig()

    def audit_path(self, home: Home) -> Path:
        return self.audit.path or home.root / "audit.jsonl"

    @field_validator("engine")
    @classmethod
    def _no_top_level_keys(cls, engine: EngineConfig) -> EngineConfig:
        repeated = [key for key in _TOP_LEVEL if key in engine.model_fields_set]
        if repeated:
            raise ValueError(f"set {', '.join(repeated)} at the top level, not under engine")
        return engine

    @field_validator("api_keys")
    @classmethod
    def _unique_ids(cls, keys: list[ApiKey]) -> list[ApiKey]:
        ids = [key.id for key in keys]
        if len(ids) != len(set(ids)):
            raise ValueError(f"key ids must be unique (got {ids})")
        return keys

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            **self.engine.model_dump(exclude_unset=True),
            base_model=self.base_model,
            quantization=self.quantization,
            tracking_uri=self.tracking_uri,
        )


def load_serve_config(path: Path, overrides: list[str] = ()) -> ServeConfig:
    """Read and validate a serve YAML; paths in it are relative to the file."""
    config = read_config(path, ServeConfig, overrides)
    update: dict = {}
    if "/" in config.base_model:
        update["base_model"] = str(relative_to_file(path, Path(config.base_model)))
    update["adapters"] = {  # a folder is relative to the file too
        name: source if names_registry(source) else str(relative_to_file(path, Path(source)))
        for name, source in config.adapters.items()
    }
    if config.adapter_dir is not None:
        update["adapter_dir"] = relative_to_file(path, config.adapter_dir)
    if config.audit.path is not None:
        audit_path = relative_to_file(path, config.audit.path)
        update["audit"] = config.audit.model_copy(update={"path": audit_path})
    return config.model_copy(update=update)


def serve_settings(
    path: Path | None, overrides: list[str] = (), adapters: list[str] = (), **flags
) -> ServeConfig:
    """The YAML at `path` (defaults without one) under KEY=VALUE `overrides` and command-line
    flags (None: not given); `adapters` are NAME=REF items added to the YAML's."""
    if path is not None and "=" in path.name and not path.exists():
        raise ConfigError(f"{path}: KEY=VALUE overrides come after a serve YAML")
    config = load_serve_config(path, overrides) if path else ServeConfig()
    preload = dict(config.adapters)
    for item in adapters:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ConfigError(f"--adapter {item!r}: expected NAME=REF")
        preload[name] = ref
    given = {key: value for key, value in flags.items() if value is not None}
    raw = {**config.model_dump(exclude_unset=True), **given, "adapters": preload}
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("invalid command-line options\n" + format_errors(e)) from None

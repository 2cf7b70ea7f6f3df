"""The typed training config: one YAML per (model, method, hardware), `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry.base_model import DEFAULT_BASE_MODEL
from registry.errors import ConfigError
from registry.refs import check_name

_LINEAR_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _fraction_or_count(value: float) -> float:
    if value >= 1 and not float(value).is_integer():
        raise ValueError("must be a fraction in (0, 1) or a whole number of examples")
    return value


# A share of the data set when below 1, else a number of examples.
SplitSize = Annotated[float, Field(gt=0), AfterValidator(_fraction_or_count)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    validation: SplitSize = 0.1
    test: SplitSize = 0.1
    seed: int = 0


class DataConfig(_Strict):
    path: Path  # jsonl, json, csv or parquet; relative to the config file
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    max_seq_length: int = Field(256, ge=16, le=131072)
    packing: bool = False
    split: SplitConfig = SplitConfig()

    @field_validator("path")
    @classmethod
    def _known_suffix(cls, path: Path) -> Path:
        if path.suffix not in {".jsonl", ".json", ".csv", ".parquet"}:
            raise ValueError(f"must be a .jsonl, .json, .csv or .parquet file (got {path.name})")
        return path


class QuantizationConfig(_Strict):
    method: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: str | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, modules):
        names = [modules] if isinstance(modules, str) else modules
        if modules != "all-linear" and (not names or set(names) - _LINEAR_MODULES):
            raise ValueError(f"choose 'all-linear' or a list from {sorted(_LINEAR_MODULES)}")
        return modules


class TrainingSettings(_Strict):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    save_steps: int = Field(50, ge=1)
    seed: int = 0


class TrainConfig(_Strict):
    name: str  # the registered model the adapter becomes a version of
    base_model: str = DEFAULT_BASE_MODEL
    experiment: str = "loraplex"
    data: DataConfig
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name)


def load_config(path: Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a YAML config; ConfigError names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    for override in overrides:
        _apply_override(raw, override, path)
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid config\n" + format_errors(e)) from None
    data_path = config.data.path.expanduser()
    if not data_path.is_absolute():
        data_path = (path.parent / data_path).resolve()
    if not data_path.is_file():
        raise ConfigError(f"{path}: data.path: file not found: {data_path}")
    base = Path(config.base_model).expanduser()
    if "/" in config.base_model and not base.is_absolute():
        base_model = str((path.parent / base).resolve())
        config = config.model_copy(update={"base_model": base_model})
    return config.model_copy(update={"data": config.data.model_copy(update={"path": data_path})})


def format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not _is_union_member(part))
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        got = "" if item["type"] in {"extra_forbidden", "missing"} else f" (got {item['input']!r})"
        lines.append(f"  {key}: {message}{got}")
    return "\n".join(dict.fromkeys(lines))


def _is_union_member(part) -> bool:
    # pydantic puts the union member it tried into the location ("str", "list[str]"): not a key.
    return part in {"str", "list[str]"}


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. training.max_steps=10")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value else ""

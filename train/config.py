"""The typed training config: one YAML per (model, method, hardware), `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from registry.base_model import DEFAULT_BASE_MODEL, LORA_MODULES
from registry.config_file import Name, Number, StrictConfig, read_config, relative_to_file
from registry.errors import ConfigError
from train.data import DATA_LOADERS


def _fraction_or_count(value: float) -> float:
    if value >= 1 and not float(value).is_integer():
        raise ValueError("must be a fraction in (0, 1) or a whole number of record groups")
    return value


# A share of the data set when below 1, else a number of record groups: records that share a
# question or an exchange stay on one side of a split, and count once.
SplitSize = Annotated[Number, Field(gt=0), AfterValidator(_fraction_or_count)]


class SplitConfig(StrictConfig):
    validation: SplitSize = 0.1
    test: SplitSize = 0.1
    seed: StrictInt = Field(0, ge=0)  # numpy's generators take no negative seed


class DataConfig(StrictConfig):
    path: Path  # jsonl, json, csv or parquet; relative to the config file
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    max_seq_length: StrictInt = Field(256, ge=16, le=131072)
    packing: StrictBool = False
    split: SplitConfig = SplitConfig()

    @field_validator("path")
    @classmethod
    def _known_suffix(cls, path: Path) -> Path:
        if path.suffix not in DATA_LOADERS:
            raise ValueError("must be a .jsonl, .json, .csv or .parquet file")
        return path


class QuantizationConfig(StrictConfig):
    method: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: StrictBool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class LoraSettings(StrictConfig):
    r: StrictInt = Field(16, ge=1, le=1024)
    alpha: Number = Field(32, gt=0)
    dropout: Number = Field(0.05, ge=0, lt=1)
    use_rslora: StrictBool = False
    target_modules: str | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, modules):
        names = [modules] if isinstance(modules, str) else modules
        if modules != "all-linear" and (not names or set(names) - set(LORA_MODULES)):
            raise ValueError(f"choose 'all-linear' or a list from {sorted(LORA_MODULES)}")
        # peft reads any other string as a regex that must match a module's whole path.
        return modules if modules == "all-linear" else names


class TrainingSettings(StrictConfig):
    max_steps: StrictInt | None = Field(100, ge=1)  # optimizer steps, or instead
    epochs: Number | None = Field(None, gt=0, le=10_000)  # passes over the training rows
    batch_size: StrictInt = Field(8, ge=1)
    gradient_accumulation_steps: StrictInt = Field(1, ge=1)
    learning_rate: Number = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: StrictInt = Field(0, ge=0)
    weight_decay: Number = Field(0.0, ge=0)
    max_grad_norm: Number = Field(1.0, gt=0)
    # adamw_8bit keeps Adam's two moments in 8 bits (bitsandbytes): 2 B instead of 8 B per
    # trainable parameter; paged_*: their pages move to host memory when the GPU runs short
    # (QLoRA's paged optimizers; on a CPU the same as unpaged).
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw_torch"
    )
    gradient_checkpointing: StrictBool = False
    logging_steps: StrictInt = Field(5, ge=1)
    eval_steps: StrictInt = Field(50, ge=1)
    eval_batch_size: StrictInt = Field(16, ge=1)
    save_steps: StrictInt = Field(50, ge=1)
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)  # numpy's legacy seed, which Trainer sets

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data):
        """One of the two: epochs leave max_steps unset (None), and the job counts them."""
        if not isinstance(data, dict):
            return data
        if data.get("epochs") is not None:
            if data.get("max_steps") is not None:
                raise ValueError(
                    "give training.max_steps or training.epochs, not both (override one with null)"
                )
            return {**data, "max_steps": None}
        if "max_steps" in data and data["max_steps"] is None:
            raise ValueError("give training.max_steps or training.epochs")
        return data

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_has_a_schedule(cls, steps: int, info: ValidationInfo) -> int:
        # transformers' "constant" schedule drops num_warmup_steps without a word.
        if steps and info.data.get("lr_scheduler") == "constant":
            raise ValueError(
                "lr_scheduler constant has no warmup: choose constant_with_warmup, or set 0"
            )
        return steps


class TrainConfig(StrictConfig):
    name: Name  # the registered model the adapter becomes a version of
    base_model: str = DEFAULT_BASE_MODEL
    experiment: str = Field("loraplex", min_length=1)  # MLflow refuses an empty name
    data: DataConfig
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()


def load_config(path: Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a YAML config; ConfigError names the file and the key."""
    config = read_config(path, TrainConfig, overrides)
    data_path = relative_to_file(path, config.data.path)
    if not data_path.is_file():
        raise ConfigError(f"{path}: data.path: file not found: {data_path}")
    if "/" in config.base_model:
        config = config.model_copy(
            update={"base_model": str(relative_to_file(path, Path(config.base_model)))}
        )
    return config.model_copy(update={"data": config.data.model_copy(update={"path": data_path})})

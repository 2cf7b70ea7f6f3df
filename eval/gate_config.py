"""The typed gate config: what a candidate adapter is measured on and what it must reach.

One YAML per adapter in `configs/gates/`. Every metric has a direction (higher or lower is
better); a rule gives an absolute bound and a tolerated regression against the baseline, both
in the metric's own units.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from pydantic import Field, StrictInt, ValidationInfo, field_validator

from registry.config_file import Name, Number, StrictConfig, read_config, relative_to_file
from registry.errors import ConfigError

# name -> True when higher is better. Perplexity comes from the engine's prompt logprobs on the
# held-out test split; the others are RAGAS metrics of generated answers on the eval set.
METRICS: dict[str, bool] = {
    "perplexity": False,
    "rouge_l": True,
    "bleu": True,
    "chrf": True,
    "string_similarity": True,
    "semantic_similarity": True,
    "context_recall": True,  # of the retrieved contexts: the same for every model, a data check
    "faithfulness": True,  # LLM-judged: needs `judge`
    "answer_relevancy": True,  # LLM-judged: needs `judge`
}
JUDGED = {"faithfulness", "answer_relevancy"}
# Fewer samples scored by both models than this give a bootstrap interval that only restates
# them (one sample: an interval of zero width, so any difference at all would be a regression).
MIN_PAIRS = 5


class MetricRule(StrictConfig):
    floor: Number | None = None  # the candidate fails below it (metrics where higher is better)
    ceiling: Number | None = None  # the candidate fails above it (perplexity)
    # Regression vs the baseline and the base accepted, in metric units; 0: the candidate must
    # be shown no worse (a candidate identical to its champion passes: its interval is [0, 0]).
    tolerance: Number = Field(0.0, ge=0)


class EvalSetConfig(StrictConfig):
    max_samples: StrictInt = Field(32, ge=MIN_PAIRS)  # test examples used; time grows with it
    context_field: str | None = None  # column with each record's passage; None: its answer
    top_k: StrictInt = Field(
        2, ge=1, le=20
    )  # passages retrieved per question for the context metrics


class GenerationConfig(StrictConfig):
    max_tokens: StrictInt = Field(64, ge=1)
    max_loras: StrictInt = Field(4, ge=1)


class BootstrapConfig(StrictConfig):
    resamples: StrictInt = Field(2000, ge=100, le=100_000)  # each is an array of the samples
    confidence: Number = Field(0.95, gt=0.5, lt=1)
    seed: StrictInt = Field(0, ge=0)


def http_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host; else ValueError saying so. Without the
    check, "localhost:8000" failed only once every answer was generated, naming nothing."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - parses it
    except ValueError as e:
        raise ValueError(str(e)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL such as http://127.0.0.1:8000/v1")
    return url


class JudgeConfig(StrictConfig):
    base_url: str  # any OpenAI-compatible server, `loraplex serve` included
    model: str
    api_key_env: str | None = None  # environment variable holding its key

    _http_url = field_validator("base_url")(http_url)


class GateConfig(StrictConfig):
    adapter: Name  # the registered model whose versions are gated
    train_config: Path  # its data and split: the test split is the held-out eval data
    eval_set: EvalSetConfig = EvalSetConfig()
    generation: GenerationConfig = GenerationConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    judge: JudgeConfig | None = None
    metrics: dict[str, MetricRule] = Field(min_length=1)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(
        cls, metrics: dict[str, MetricRule], info: ValidationInfo
    ) -> dict[str, MetricRule]:
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown {sorted(unknown)}; choose from {sorted(METRICS)}")
        judged = JUDGED & set(metrics)
        # `judge` comes before `metrics`, so it is validated already (absent if it failed).
        if judged and "judge" in info.data and info.data["judge"] is None:
            raise ValueError(f"{sorted(judged)} are LLM-judged: set `judge`")
        for name, rule in metrics.items():
            wrong = "ceiling" if METRICS[name] else "floor"
            if getattr(rule, wrong) is not None:
                better = "higher" if METRICS[name] else "lower"
                raise ValueError(f"{name}: {better} is better, so it takes no {wrong}")
            # A bound no model can meet fails every candidate; say so instead.
            if rule.floor is not None and not 0 <= rule.floor <= 1:
                raise ValueError(f"{name}: floor {rule.floor:g} is outside its range [0, 1]")
            if rule.ceiling is not None and rule.ceiling < 1:
                raise ValueError(
                    f"{name}: ceiling {rule.ceiling:g} is below 1, the least perplexity"
                )
        return metrics


def load_gate_config(path: Path, overrides: list[str] = ()) -> GateConfig:
    """Read and validate a gate YAML; the training config it names must load too."""
    from train.config import load_config

    config = read_config(path, GateConfig, overrides)
    train_config = relative_to_file(path, config.train_config)
    if not train_config.is_file():
        raise ConfigError(f"{path}: train_config: file not found: {train_config}")
    train = load_config(train_config)  # fails here, naming its file, not after loading models
    if train.name != config.adapter:
        raise ConfigError(
            f"{path}: adapter: {config.adapter!r} is not what its train_config trains "
            f"({train_config} has name: {train.name!r}), so its test split is another adapter's"
        )
    return config.model_copy(update={"train_config": train_config})

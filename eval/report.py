"""The gate's report: `report.json` for machines, `report.md` for people and GitHub summaries."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.decision import Verdict
from eval.gate_config import MetricRule


@dataclass
class GateReport:
    adapter: str
    candidate: str  # name/version
    baseline: str  # "name/N (@champion)", or "base (why)": no champion, or none to compare
    base_model: str
    measured_on: str  # the server's URL, or the engine in the gate's process
    samples: int  # questions the RAGAS-style metrics were measured on
    perplexity_examples: int  # test split examples with answer tokens
    rules: dict[str, MetricRule]
    verdicts: list[Verdict]
    notes: list[str] = field(default_factory=list)  # what may bias the comparison

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failed_metrics(self) -> list[str]:
        return [v.metric for v in self.verdicts if not v.passed]

    def to_dict(self) -> dict:
        return {
            "result": "pass" if self.passed else "fail",
            "adapter": self.adapter,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "base_model": self.base_model,
            "measured_on": self.measured_on,
            "samples": self.samples,
            "perplexity_examples": self.perplexity_examples,
            "failed_metrics": self.failed_metrics,
            "notes": self.notes,
            "metrics": {
                v.metric: {**asdict(v), "rule": self.rules[v.metric].model_dump()}
                for v in self.verdicts
            },
        }

    def to_markdown(self) -> str:
        result = "PASS" if self.passed else "FAIL"
        lines = [
            f"## Quality gate {result}: {self.candidate}",
            "",
            f"Baseline: {self.baseline}. Base model: {self.base_model}, measured on "
            f"{self.measured_on}. "
            f"{self.samples} eval questions, {self.perplexity_examples} perplexity examples.",
            "",
            *(["Notes:", *(f"- {note}" for note in self.notes), ""] if self.notes else []),
            "| metric | better | candidate | baseline | base | gain vs baseline [interval] "
            "| rule | result |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in self.verdicts:
            vs = v.vs_baseline
            gain = f"{vs.gain:+.4g} [{vs.low:+.4g}, {vs.high:+.4g}]" if vs else "-"
            lines.append(
                f"| {v.metric} | {'higher' if v.higher_is_better else 'lower'} "
                f"| {v.candidate:.4g} | {_num(v.baseline)} | {_num(v.base)} | {gain} "
                f"| {_rule(self.rules[v.metric])} | {'pass' if v.passed else 'FAIL'} |"
            )
        reasons = [f"- **{v.metric}**: {r}" for v in self.verdicts for r in v.reasons]
        if reasons:
            lines += ["", "Why it failed:", *reasons]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[Path]:
        """report.json and report.md in `folder`; the markdown also goes to the GitHub summary."""
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "report.json", folder / "report.md"]
        files[0].write_text(json.dumps(_finite(self.to_dict()), indent=2) + "\n")
        files[1].write_text(self.to_markdown())
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a") as f:
                f.write(self.to_markdown() + "\n")
        return files


def _finite(value):
    """NaN (a metric no sample could be scored on) and infinities (a perplexity over a
    log-likelihood of -inf) as null: strict JSON readers refuse NaN and Infinity."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _rule(rule: MetricRule) -> str:
    parts = []
    if rule.floor is not None:
        parts.append(f">= {rule.floor:g}")
    if rule.ceiling is not None:
        parts.append(f"<= {rule.ceiling:g}")
    parts.append(f"tolerance {rule.tolerance:g}")
    return ", ".join(parts)

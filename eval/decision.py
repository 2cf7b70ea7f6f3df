"""Pass or fail per metric: absolute bounds, and regressions against the baseline beyond noise.

Candidate and baseline are scored on the same samples, so their difference is bootstrapped
in pairs: resample sample indices once and compute both statistics on the same resample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eval.gate_config import METRICS, BootstrapConfig, MetricRule


@dataclass(frozen=True)
class Samples:
    """One model's per-sample values of one metric.

    The statistic is sum(values) / sum(weights) (a mean when the weights are 1), and
    exp() of that for perplexity, where values are answer NLLs and weights answer token counts.
    """

    values: np.ndarray  # [n]
    weights: np.ndarray  # [n]
    exponent: bool = False

    @classmethod
    def scores(cls, values: list[float]) -> Samples:
        return cls(np.asarray(values, dtype=np.float64), np.ones(len(values)))

    @property
    def statistic(self) -> float:
        return float(_statistic(self.values[None], self.weights[None], self.exponent)[0])


@dataclass(frozen=True)
class Comparison:
    """How much better the candidate is than another model, with a paired bootstrap interval.

    `gain` is oriented so that positive means better (for perplexity: other minus candidate).
    """

    gain: float
    low: float
    high: float


@dataclass
class Verdict:
    metric: str
    higher_is_better: bool
    candidate: float
    baseline: float | None
    base: float | None
    vs_baseline: Comparison | None
    vs_base: Comparison | None
    passed: bool = True
    reasons: list[str] = field(default_factory=list)


def compare(candidate: Samples, other: Samples, higher_is_better: bool, boot: BootstrapConfig):
    """The candidate's gain over `other`, with a `boot.confidence` paired bootstrap interval."""
    n = len(candidate.values)
    rng = np.random.default_rng(boot.seed)
    index = rng.integers(0, n, size=(boot.resamples, n))  # [resamples, n], shared by both models
    ours = _statistic(candidate.values[index], candidate.weights[index], candidate.exponent)
    theirs = _statistic(other.values[index], other.weights[index], other.exponent)
    gains = ours - theirs if higher_is_better else theirs - ours
    tail = (1 - boot.confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    sign = 1 if higher_is_better else -1
    return Comparison(sign * (candidate.statistic - other.statistic), float(low), float(high))


def judge(
    metric: str,
    rule: MetricRule,
    candidate: Samples,
    baseline: Samples | None,
    base: Samples | None,
    boot: BootstrapConfig,
) -> Verdict:
    """The verdict on one metric. A regression fails only when the whole interval of the gain
    lies below -tolerance: worse than tolerated, and beyond what resampling noise explains."""
    higher = METRICS[metric]
    verdict = Verdict(
        metric,
        higher,
        candidate.statistic,
        baseline.statistic if baseline is not None else None,
        base.statistic if base is not None else None,
        compare(candidate, baseline, higher, boot) if baseline is not None else None,
        compare(candidate, base, higher, boot) if base is not None else None,
    )
    value = verdict.candidate
    if rule.floor is not None and value < rule.floor:
        verdict.reasons.append(f"{value:.4g} is below the floor {rule.floor:g}")
    if rule.ceiling is not None and value > rule.ceiling:
        verdict.reasons.append(f"{value:.4g} is above the ceiling {rule.ceiling:g}")
    vs = verdict.vs_baseline
    if vs is not None and vs.high < -rule.tolerance:
        verdict.reasons.append(
            f"regressed against the baseline by {-vs.gain:.4g} "
            f"(interval of the gain [{vs.low:.4g}, {vs.high:.4g}], tolerance {rule.tolerance:g})"
        )
    verdict.passed = not verdict.reasons
    return verdict


def _statistic(values: np.ndarray, weights: np.ndarray, exponent: bool) -> np.ndarray:
    """Row-wise sum(values) / sum(weights) of [rows, n] arrays, exp() of it when asked."""
    ratio = values.sum(axis=1) / weights.sum(axis=1)
    return np.exp(ratio) if exponent else ratio

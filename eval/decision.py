"""Pass or fail per metric: absolute bounds, and against the baseline and the base a gain
whose whole bootstrap interval lies above -tolerance (no worse than tolerated, beyond noise).

Candidate and baseline are scored on the same samples, so their difference is bootstrapped
in pairs: resample sample indices once and compute both statistics on the same resample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eval.gate_config import METRICS, MIN_PAIRS, BootstrapConfig, MetricRule


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
        """Over the samples that have a value (NaN: a broken one, which `judge` fails); NaN if
        none has."""
        ok = self.scored
        if not ok.any():
            return float("nan")
        return float(self.on(np.flatnonzero(ok)[None])[0])

    def on(self, index: np.ndarray) -> np.ndarray:
        """The statistic of each row of sample indices [rows, n] -> [rows]."""
        return _statistic(self.values[index], self.weights[index], self.exponent)

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.values)  # [n] bool


@dataclass(frozen=True)
class Comparison:
    """How much better the candidate is than another model, with a paired bootstrap interval.

    `gain` is oriented so that positive means better (for perplexity: other minus candidate).
    """

    gain: float
    low: float
    high: float
    pairs: int  # samples both models have a score for


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


def compare(
    candidate: Samples, other: Samples, higher_is_better: bool, boot: BootstrapConfig
) -> Comparison | None:
    """The candidate's gain over `other` on the samples both have scores for, with a
    `boot.confidence` paired bootstrap interval; None when fewer than MIN_PAIRS have both."""
    both = np.flatnonzero(candidate.scored & other.scored)  # pairs need both scores
    if len(both) < MIN_PAIRS:
        return None
    rng = np.random.default_rng(boot.seed)
    # [resamples, n] sample indices, shared by both models
    index = both[rng.integers(0, len(both), size=(boot.resamples, len(both)))]
    ours, theirs = candidate.on(index), other.on(index)
    gains = ours - theirs if higher_is_better else theirs - ours
    tail = (1 - boot.confidence) / 2
    with np.errstate(invalid="ignore"):  # inf - inf: a non-finite candidate fails in `judge`
        low, high = np.quantile(gains, [tail, 1 - tail])
    sign = 1 if higher_is_better else -1
    point = candidate.on(both[None])[0] - other.on(both[None])[0]
    return Comparison(float(sign * point), float(low), float(high), len(both))


def judge(
    metric: str,
    rule: MetricRule,
    candidate: Samples,
    baseline: Samples | None,
    base: Samples | None,
    boot: BootstrapConfig,
) -> Verdict:
    """The verdict on one metric. Against the baseline and the base it passes only when the
    whole interval of the gain lies above -tolerance: shown to be no worse than tolerated (a
    gate that promotes must not take noise for the benefit of the doubt: on a small eval set
    a candidate far worse often has an interval reaching past zero); fewer than MIN_PAIRS
    samples scored by both cannot tell, and fail. A sample the candidate has no finite value
    for fails."""
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
    broken = int((~np.isfinite(candidate.values)).sum())
    if np.isnan(value):
        verdict.reasons.append("no sample could be scored")
    elif broken:  # the model's NaN or infinite value (a NaN log-likelihood): not averaged away
        verdict.reasons.append(
            f"{broken} of {len(candidate.values)} samples have no finite value (NaN or infinite)"
        )
    if rule.floor is not None and value < rule.floor:
        verdict.reasons.append(f"{value:.4g} is below the floor {rule.floor:g}")
    if rule.ceiling is not None and value > rule.ceiling:
        verdict.reasons.append(f"{value:.4g} is above the ceiling {rule.ceiling:g}")
    # Against the base too (when it is not the baseline): else each champion could lose up to
    # a tolerance to the one before, and the line of them drift below the base unnoticed.
    against = [("the baseline", baseline, verdict.vs_baseline)]
    if base is not baseline:
        against.append(("the base model", base, verdict.vs_base))
    for other, samples, vs in against:
        if samples is None:
            continue
        if vs is None:
            paired = int((candidate.scored & samples.scored).sum())
            verdict.reasons.append(
                f"{paired} of {len(candidate.values)} samples scored for both it and {other}: "
                "too few to tell a "
                f"regression from noise (at least {MIN_PAIRS}; more test records, or "
                "eval_set.max_samples)"
            )
        elif vs.high < -rule.tolerance:
            verdict.reasons.append(
                f"regressed against {other} by {-vs.gain:.4g} (interval of the gain "
                f"[{vs.low:.4g}, {vs.high:.4g}], tolerance {rule.tolerance:g})"
            )
        elif vs.low < -rule.tolerance:
            verdict.reasons.append(
                f"may have regressed against {other} past the tolerance {rule.tolerance:g}: "
                f"the interval of the gain [{vs.low:.4g}, {vs.high:.4g}] reaches below "
                f"{-rule.tolerance or 0:g} on {vs.pairs} samples: more of them "
                "(eval_set.max_samples) narrow it, a wider tolerance accepts it"
            )
    verdict.passed = not verdict.reasons
    return verdict


def _statistic(values: np.ndarray, weights: np.ndarray, exponent: bool) -> np.ndarray:
    """Row-wise sum(values) / sum(weights) of [rows, n] arrays, exp() of it when asked."""
    ratio = values.sum(axis=1) / weights.sum(axis=1)
    return np.exp(ratio) if exponent else ratio

"""A quality gate run: measure the candidate, its baseline and the base; decide; record; promote.

    gate = QualityGate(config, candidate="construction-faq/3")
    report = gate.run(output=Path("reports"), promote=True)   # report.passed

The baseline is `--baseline` if given, else the adapter's champion; with no champion yet the
base model is the baseline, so a first adapter must at least beat (or match) the base. So is
it when the candidate is the champion itself, which nothing could show regressing otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

from eval.decision import Samples, Verdict, judge
from eval.eval_set import build_eval_set, select_test_records
from eval.gate_config import MIN_PAIRS, GateConfig, http_url
from eval.measure import EngineModels, Models, answer_likelihoods, answers
from eval.report import GateReport
from eval.scores import Scorer
from registry.base_model import tokenizer_differences
from registry.errors import ConfigError, NotFoundError, UsageError
from registry.lineage import tokenizer_from_tags
from registry.refs import CHAMPION, AdapterRef, parse_ref
from registry.store import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)
CANDIDATE, BASELINE = "candidate", "baseline"  # their names inside the engine


class QualityGate:
    def __init__(
        self,
        config: GateConfig,
        candidate: str,
        baseline: str | None = None,
        tracking_uri: str | None = None,
        server: str | None = None,
        api_key: str | None = None,
    ):
        from train.config import load_config

        self.config = config
        if server is not None:  # before anything loads, not once every answer is made
            try:
                http_url(server)
            except ValueError as error:
                raise UsageError(f"--server: {server!r}: {error}") from None
        self.server, self.api_key = server, api_key  # measure through it (None: in process)
        self.train = load_config(config.train_config)
        self.registry = AdapterRegistry(tracking_uri)
        self.candidate = self._version(candidate, "--candidate")
        self.notes: list[str] = []  # for the report's reader: what may bias the comparison
        self.champion_elsewhere: AdapterVersion | None = None  # on a base this gate lacks
        # Read once: the baseline, the promotion check and the promotion all concern this one.
        self.champion = self._champion()
        self.baseline = self._baseline(baseline)
        measured = self._measured_split()
        # The candidate's unrecorded split counts: nothing shows it kept the test records out.
        differences = self._split_differences(self.candidate, measured, unrecorded=True)
        if differences:
            raise UsageError(
                f"--candidate {self.candidate.ref}: nothing shows it was trained on the split "
                f"this gate measures on, so it may have trained on its test records: "
                f"{differences}"
            )
        differences = self._split_differences(self.baseline, measured) if self.baseline else ""
        if differences:
            # Refusing would block exactly the change that moves the data (the champion was
            # trained on the old one); the reader is told instead.
            self.notes.append(
                f"baseline {self.baseline.ref} was trained on another split than the one "
                f"measured here, so it may have seen test records: {differences}"
            )

    def run(self, output: Path, promote: bool = False) -> GateReport:
        if promote:
            self._check_promotable()
        try:  # before the minutes of measuring, not after
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--output {output}: {e.strerror}") from None
        report = self.measure()
        files = report.write(output)
        self.registry.record_gate(self.candidate, *self._record(report), files)
        log.info("gate report: %s", files[1])
        if promote and report.passed:
            self._promote()
        return report

    def _promote(self) -> None:
        """Move the champion alias to the candidate, unless it moved while this gate measured:
        the candidate was never compared with its new holder. (MLflow has no compare-and-set
        of an alias; reading it again just before narrows that window to milliseconds.)"""
        now = self._champion()
        seen, held = (v.ref if v else "none" for v in (self.champion, now))
        if held != seen:
            raise UsageError(
                f"--promote: {self.config.adapter}@{CHAMPION} moved from {seen} to {held} "
                f"while this gate measured, so {self.candidate.ref} is not promoted (it was "
                "judged against the former one; its report stands): gate it again"
            )
        self.registry.promote(self.candidate.name, self.candidate.version, CHAMPION)

    def measure(self) -> GateReport:
        from train.data import load_splits

        splits = load_splits(self.train.data)
        records = select_test_records(splits, self.config.eval_set.max_samples)
        ragas = [m for m in self.config.metrics if m != "perplexity"]
        samples = []
        if ragas:  # before the models load: a bad eval_set setting fails in seconds
            scorer = Scorer(self.config.judge)
            settings = self.config.eval_set
            samples = build_eval_set(
                splits, records, settings.context_field, settings.top_k, scorer.embed
            )
            if len(samples) < MIN_PAIRS:  # the data's shape, not the candidate's fault
                raise ConfigError(
                    f"eval_set: {len(samples)} of the {len(records)} test records can be "
                    f"asked and scored: too few to compare (at least {MIN_PAIRS})"
                )
        models, roles = self._models()
        measured: dict[str, dict[str | None, Samples]] = {}
        if "perplexity" in self.config.metrics:
            measured["perplexity"] = self._perplexity(models, roles, records, splits.format)
            kept = len(measured["perplexity"][CANDIDATE].values)
            if kept < MIN_PAIRS:  # the data's fault, not the candidate's
                raise ConfigError(
                    f"perplexity: {kept} of the {len(records)} test records keep an answer "
                    f"token within the train config's data.max_seq_length "
                    f"({self.train.data.max_seq_length}): too few to score (at least "
                    f"{MIN_PAIRS})"
                )
        if ragas:
            measured |= self._ragas(models, roles, samples, scorer, ragas)
        verdicts = [self._verdict(metric, measured[metric]) for metric in self.config.metrics]
        ppl = measured.get("perplexity")
        return GateReport(
            adapter=self.config.adapter,
            candidate=self.candidate.ref,
            baseline=self._baseline_label(),
            base_model=self.train.base_model,
            measured_on=self.server or "the serving engine, in process",
            samples=len(samples),
            perplexity_examples=len(ppl[CANDIDATE].values) if ppl else 0,
            rules=dict(self.config.metrics),
            verdicts=verdicts,
            notes=self.notes,
        )

    def _models(self) -> tuple[Models, list[str | None]]:
        """Where the models are measured, and their roles (None is the base): the server if
        given, else the serving engine over the base as trained, candidate and baseline loaded."""
        roles: list[str | None] = [CANDIDATE] if self.baseline is None else [CANDIDATE, BASELINE]
        roles.append(None)
        if self.server is not None:
            from transformers import AutoTokenizer

            from eval.served import ServedModels
            from registry.base_model import resolve_base_model

            base = resolve_base_model(self.train.base_model, self.registry.home)
            versions = {CANDIDATE: self.candidate}
            if self.baseline is not None:
                versions[BASELINE] = self.baseline
            tokenizer = AutoTokenizer.from_pretrained(base.path)
            return ServedModels(self.server, self.api_key, tokenizer, versions), roles
        from serve import LLM

        llm = LLM(
            base_model=self.train.base_model,
            quantization=self.train.quantization.method,
            double_quant=self.train.quantization.double_quant,
            max_loras=self.config.generation.max_loras,
            tracking_uri=self.registry.tracking_uri,
        )
        llm.load_adapter(CANDIDATE, self.candidate.ref)
        if self.baseline is not None:
            llm.load_adapter(BASELINE, self.baseline.ref)
        return EngineModels(llm), roles

    def _perplexity(self, models, roles, records, fmt: str) -> dict[str | None, Samples]:
        nll = answer_likelihoods(models, records, fmt, self.train.data.max_seq_length, roles)
        return {
            role: Samples(_array([x.nll for x in v]), _array([x.tokens for x in v]), exponent=True)
            for role, v in nll.items()
        }

    def _ragas(self, models, roles, samples, scorer, metrics) -> dict[str, dict]:
        from tqdm import tqdm

        conversations = [s.messages for s in samples]
        answered = answers(models, conversations, self.config.generation.max_tokens, roles)
        measured: dict[str, dict[str | None, Samples]] = {metric: {} for metric in metrics}
        with tqdm(total=len(metrics) * len(roles), desc="scoring", unit="metric") as bar:
            for metric in metrics:
                for role in roles:
                    scores = scorer.score(metric, samples, answered[role])
                    measured[metric][role] = Samples.scores(scores)
                    bar.update(1)
        return measured

    def _verdict(self, metric: str, by_model: dict[str | None, Samples]) -> Verdict:
        # With no champion the base is the baseline: compared (and gated) once, as the baseline.
        baseline = by_model[BASELINE] if self.baseline is not None else by_model[None]
        return judge(
            metric,
            self.config.metrics[metric],
            by_model[CANDIDATE],
            baseline,
            by_model[None],
            self.config.bootstrap,
        )

    def _record(self, report: GateReport) -> tuple[dict[str, float], dict[str, str]]:
        metrics = {f"gate_{v.metric}": v.candidate for v in report.verdicts}
        metrics["gate_passed"] = float(report.passed)
        tags = {
            "gate_result": "pass" if report.passed else "fail",
            "gate_baseline": report.baseline,
            "gate_failed_metrics": ",".join(report.failed_metrics) or "none",
        }
        return metrics, tags

    def _check_promotable(self) -> None:
        """Refuse `--promote` against a `--baseline` other than the champion: the champion
        would be replaced by a candidate that was never compared with it."""
        champion = self.champion
        if champion is None:
            return  # nothing to replace
        if self._base_differences(champion):
            return  # it cannot be compared on this base; the report's note says so
        if self.candidate.version == champion.version:
            return  # promoting the champion again replaces nothing
        if self.baseline is None or self.baseline.version != champion.version:
            raise UsageError(
                f"--promote would replace {champion.ref} (@{CHAMPION}) without comparing "
                f"--candidate {self.candidate.ref} with it: drop --baseline to promote"
            )

    def _measured_split(self) -> dict[str, str]:
        """What decides the test split measured here: the data, `seed` and `test` (a version
        trained with another `validation` size kept the same records out of training)."""
        from train.data import data_hash

        split = self.train.data.split
        return {
            "data hash": data_hash(self.train.data.path),
            "data.split.seed": str(split.seed),
            "data.split.test": str(split.test),
        }

    def _split_differences(
        self, version: AdapterVersion, expected: dict[str, str], unrecorded: bool = False
    ) -> str:
        """How the data and split a version was trained on (its lineage's data hash, its
        run's params) differ from `expected`; "" when nothing recorded does. With
        `unrecorded`, what its lineage does not record counts as a difference."""
        params = self.registry.run_params(version)
        recorded = {
            "data hash": version.tags.get("data_hash"),
            "data.split.seed": params.get("data.split.seed"),
            "data.split.test": params.get("data.split.test"),
        }
        return "; ".join(
            f"{key}: {recorded[key] or 'not recorded'} when trained, {value} in "
            f"{self.config.train_config}"
            for key, value in expected.items()
            if (recorded[key] is not None or unrecorded) and recorded[key] != value
        )

    def _version(self, text: str, option: str) -> AdapterVersion:
        ref = parse_ref(text)
        if ref.name != self.config.adapter:
            raise UsageError(
                f"{option} {text!r} is not a version of {self.config.adapter!r}, "
                "the adapter this gate config is for"
            )
        return self.registry.get(ref)

    def _baseline(self, baseline: str | None) -> AdapterVersion | None:
        champion = self.champion
        if champion is not None and (differ := self._base_differences(champion)):
            # The change of base a new train config makes: refusing would block it for good.
            self.champion_elsewhere = champion
            instead = "its own base" if baseline is None else f"{baseline} and its own base"
            self.notes.append(
                f"the champion {champion.ref} was trained on another base model or tokenizer "
                f"({differ}), which this gate does not serve: "
                f"the candidate is judged against {instead} instead"
            )
        if baseline is not None:
            chosen = self._version(baseline, "--baseline")
            if differ := self._base_differences(chosen):
                raise UsageError(
                    f"--baseline {chosen.ref} was trained on another base model or tokenizer "
                    f"than --candidate {self.candidate.ref} ({differ}): "
                    "one engine cannot serve both"
                )
            return chosen
        if champion is None or self.champion_elsewhere is not None:
            return None  # judged against the floors and the base
        if champion.version == self.candidate.version:
            return None  # against itself no regression could show: the base instead
        return champion

    def _champion(self) -> AdapterVersion | None:
        try:
            return self.registry.get(AdapterRef(self.config.adapter, alias=CHAMPION))
        except NotFoundError:
            return None

    def _base_differences(self, version: AdapterVersion) -> str:
        """How the base and tokenizer `version` was trained on differ from the candidate's,
        as far as both recorded ("" if they do not): one engine serves both only if not."""
        theirs, ours = version.tags, self.candidate.tags
        differ = []
        base = theirs.get("base_fingerprint"), ours.get("base_fingerprint")
        if None not in base and base[0] != base[1]:
            differ.append(f"base {base[0]}, not {base[1]}")
        parts = tokenizer_differences(tokenizer_from_tags(theirs), tokenizer_from_tags(ours))
        differ += [f"the tokenizer's {part}" for part in parts]
        return "; ".join(differ)

    def _baseline_label(self) -> str:
        if self.baseline is None:
            if CHAMPION in self.candidate.aliases:
                return "base (the candidate is the champion)"
            if self.champion_elsewhere is not None:
                return f"base ({self.champion_elsewhere.ref}, the champion, is on another base)"
            return "base (no champion yet)"
        v = self.baseline
        aliases = f" ({', '.join('@' + a for a in v.aliases)})" if v.aliases else ""
        return f"{v.ref}{aliases}"


def _array(values: list[float]):
    import numpy as np

    return np.asarray(values, dtype=np.float64)

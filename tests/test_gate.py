"""Quality gates: decisions, configs, the eval set, and `loraplex gate` end to end on SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from eval.decision import Samples, compare, judge
from eval.gate_config import MIN_PAIRS, BootstrapConfig, MetricRule, load_gate_config
from registry.app import app
from registry.errors import ConfigError, UsageError
from registry.refs import parse_ref
from registry.store import AdapterRegistry
from tests.helpers import PROJECT, register_folder
from train.config import load_config

TRAIN_CONFIG = PROJECT / "configs/train/country-facts_smollm2-135m_qlora_cpu.yaml"
BOOT = BootstrapConfig(resamples=1000, confidence=0.95, seed=0)


def _gate(*args: str):
    return CliRunner().invoke(app, ["gate", *args])


def _scores(mean: float, n: int = 40, spread: float = 0.05, seed: int = 1) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples.scores((mean + spread * rng.standard_normal(n)).tolist())


def test_perplexity_is_exp_of_total_nll_over_total_answer_tokens():
    samples = Samples(np.array([2.0, 6.0]), np.array([1.0, 3.0]), exponent=True)
    assert samples.statistic == pytest.approx(np.exp(8.0 / 4.0))


def test_paired_bootstrap_sees_a_consistent_small_gain_that_unpaired_noise_would_hide():
    # Every sample improves by 0.02 while samples differ by far more: only pairing shows it.
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0, 1, 50)
    gain = compare(Samples.scores(baseline + 0.02), Samples.scores(baseline), True, BOOT)
    assert gain.gain == pytest.approx(0.02)
    assert 0.0199 < gain.low <= gain.high < 0.0201


def test_lower_is_better_metrics_report_a_rise_as_a_negative_gain():
    worse = Samples(np.full(5, 3.0), np.ones(5), exponent=True)
    better = Samples(np.ones(5), np.ones(5), exponent=True)
    assert compare(worse, better, False, BOOT).gain == pytest.approx(np.e - np.e**3)


@pytest.mark.parametrize(
    ("candidate", "rule", "passed", "reason"),
    [
        (0.50, MetricRule(tolerance=0.05), True, None),  # equal to the baseline
        (0.47, MetricRule(tolerance=0.05), True, None),  # worse, but within tolerance
        (0.30, MetricRule(tolerance=0.05), False, "regressed against the baseline"),
        (0.60, MetricRule(floor=0.7), False, "below the floor 0.7"),
    ],
)
def test_verdict_applies_floor_and_tolerated_regression(candidate, rule, passed, reason):
    verdict = judge("rouge_l", rule, _scores(candidate), _scores(0.5), _scores(0.2), BOOT)
    assert verdict.passed is passed
    assert verdict.baseline == pytest.approx(_scores(0.5).statistic)
    if reason:
        assert reason in " ".join(verdict.reasons)


def test_a_candidate_better_than_the_champion_but_below_the_base_fails():
    """Each champion may lose up to a tolerance to the one before; against the base too, the
    line of them cannot drift below it (and the champion gated again, against the base alone,
    gets the verdict it got)."""
    rule = MetricRule(tolerance=0.02)
    verdict = judge("rouge_l", rule, _scores(0.15), _scores(0.1), _scores(0.2), BOOT)
    assert verdict.vs_baseline.gain > 0 and not verdict.passed
    [reason] = verdict.reasons
    assert reason.startswith("regressed against the base model by 0.05")
    base = _scores(0.2)
    alone = judge("rouge_l", rule, _scores(0.15), base, base, BOOT)  # the base as baseline
    assert [r.split(" by ")[0] for r in alone.reasons] == ["regressed against the baseline"]


def test_a_regression_noise_may_hide_fails_naming_its_interval():
    # Mean 0.1 lower but independent, very noisy samples: the interval reaches past zero.
    verdict = judge(
        "rouge_l",
        MetricRule(tolerance=0.0),
        _scores(0.4, n=10, spread=0.4, seed=1),
        _scores(0.5, n=10, spread=0.4, seed=2),
        None,
        BOOT,
    )
    vs = verdict.vs_baseline
    assert vs.low < 0 < vs.high and not verdict.passed
    assert verdict.reasons == [
        f"may have regressed against the baseline past the tolerance 0: the interval of the "
        f"gain [{vs.low:.4g}, {vs.high:.4g}] reaches below 0 on 10 samples: more of them "
        "(eval_set.max_samples) narrow it, a wider tolerance accepts it"
    ]


def _pass_rate(shift: float, noise: float, gates: int = 100) -> float:
    """The share of simulated gates of 24 samples that pass a candidate whose ROUGE-L is its
    champion's plus `shift`, plus `noise` (sd) on each sample."""
    passed = 0
    for seed in range(gates):
        rng = np.random.default_rng(seed)
        champion = np.clip(rng.normal(0.35, 0.15, 24), 0, 1)
        candidate = np.clip(champion + shift + rng.normal(0, noise, 24), 0, 1)
        boot = BootstrapConfig(resamples=1000, confidence=0.95, seed=seed)
        rule = MetricRule(tolerance=0.03)
        samples = (Samples.scores(candidate.tolist()), Samples.scores(champion.tolist()))
        passed += judge("rouge_l", rule, *samples, samples[1], boot).passed
    return passed / gates


def test_a_candidate_three_tolerances_worse_fails_however_wide_its_interval():
    """Failing only a regression the whole interval showed passed most such candidates (their
    intervals, 24 noisy samples, reached above -tolerance): the gate promoted them."""
    assert _pass_rate(-0.1, noise=0.25) <= 0.02
    assert _pass_rate(0.0, noise=0.03) >= 0.95  # a retrained champion's noise passes


def test_unscored_samples_are_left_out_of_pairs_and_an_unscorable_metric_fails():
    nan = float("nan")
    candidate = Samples.scores([0.9, nan, 0.5, 0.7, 0.6, 0.8, 0.4])
    baseline = Samples.scores([0.8, 0.1, nan, 0.6, 0.5, 0.7, 0.3])
    assert candidate.statistic == pytest.approx(0.65)  # its own six scores
    comparison = compare(candidate, baseline, True, BOOT)  # pairs 0, 3, 4, 5 and 6
    assert (comparison.gain, comparison.pairs) == (pytest.approx(0.1), 5)
    verdict = judge("faithfulness", MetricRule(), Samples.scores([nan, nan]), None, None, BOOT)
    assert not verdict.passed and verdict.reasons == ["no sample could be scored"]


@pytest.mark.parametrize("n", [1, MIN_PAIRS - 1])
def test_too_few_paired_samples_to_tell_noise_fail_rather_than_judge_a_tiny_difference(n):
    """One pair gives an interval of zero width: a 0.3 % difference was a regression, and an
    equally tiny gain would have passed whatever the noise."""
    candidate = Samples(np.full(n, 5.0), np.full(n, 4.0), exponent=True)
    base = Samples(np.full(n, 4.99), np.full(n, 4.0), exponent=True)
    verdict = judge("perplexity", MetricRule(ceiling=10.0), candidate, base, base, BOOT)
    assert verdict.vs_baseline is None and not verdict.passed
    assert verdict.reasons == [
        f"{n} of {n} samples scored for both it and the baseline: too few to tell a regression "
        f"from noise (at least {MIN_PAIRS}; more test records, or eval_set.max_samples)"
    ]
    more = judge("perplexity", MetricRule(ceiling=10.0), *(
        Samples(np.full(MIN_PAIRS, v), np.full(MIN_PAIRS, 4.0), exponent=True)
        for v in (5.0, 4.99, 4.99)
    ), BOOT)  # fmt: skip
    assert more.vs_baseline.pairs == MIN_PAIRS and "regressed" in more.reasons[0]


def test_labelled_tokens_a_server_gave_no_logprob_make_the_sample_nan_not_shorter(tokenizer):
    """A server sends null for a NaN logprob (strict JSON has no NaN): leaving the token out
    averaged the broken sample away."""
    from eval.measure import answer_likelihoods
    from train.data import IGNORE_INDEX, encode

    record = {"messages": [
        {"role": "user", "content": "What is the capital of Norway?"},
        {"role": "assistant", "content": "Oslo."},
    ]}  # fmt: skip
    labels = encode(record, "messages", tokenizer, 512)["labels"]
    answer = [i for i, label in enumerate(labels) if i and label != IGNORE_INDEX]

    class Served:
        def prompt_logprobs(self, prompts, models):
            [ids] = prompts
            logprobs = [None] + [-1.0] * (len(ids) - 1)  # the first token has none
            if models == ["candidate"]:
                logprobs[answer[-1]] = None
            return [logprobs]

    served = Served()
    served.tokenizer = tokenizer
    [ok] = answer_likelihoods(served, [record], "messages", 512, [None])[None]
    assert (ok.nll, ok.tokens) == (len(answer), len(answer))
    [broken] = answer_likelihoods(served, [record], "messages", 512, ["candidate"])["candidate"]
    assert np.isnan(broken.nll) and broken.tokens == len(answer)


def _write_gate(tmp_path, body: str):
    path = tmp_path / "gate.yaml"
    path.write_text(f"adapter: country-facts\ntrain_config: {TRAIN_CONFIG}\n{body}")
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("metrics: {perplexity: {floor: 2}}", "lower is better, so it takes no floor"),
        ("metrics: {bertscore: {}}", "unknown ['bertscore']"),
        ("metrics: {faithfulness: {floor: 0.5}}", "LLM-judged: set `judge`"),
        (
            "metrics: {faithfulness: {}}\njudge: {base_url: 'localhost:8000', model: j}",
            "judge.base_url: not an http(s) URL such as http://127.0.0.1:8000/v1 (got 'localh",
        ),
        (
            "metrics: {faithfulness: {}}\njudge: {base_url: 'http://h:99999/v1', model: j}",
            "judge.base_url: Port out of range 0-65535 (got 'http://h:99999/v1')",
        ),
        ("metrics: {rouge_l: {tolerance: -1}}", "metrics.rouge_l.tolerance"),
        ("metrics: {rouge_l: {}}\neval_set: {max_sample: 3}", "eval_set.max_sample: unknown key"),
        ("metrics: {}", "metrics: "),
    ],
)
def test_bad_gate_configs_are_refused_with_the_key_named(tmp_path, body, message):
    with pytest.raises(ConfigError, match=r"gate\.yaml: invalid config") as error:
        load_gate_config(_write_gate(tmp_path, body))
    assert message in str(error.value)


def test_gate_config_naming_a_missing_train_config_exits_2(tmp_path, home):
    path = tmp_path / "gate.yaml"
    path.write_text("adapter: x\ntrain_config: nope.yaml\nmetrics: {rouge_l: {}}\n")
    result = _gate(str(path), "--candidate", "x/1")
    assert result.exit_code == 2
    assert "train_config: file not found" in result.output


def test_unknown_or_foreign_candidates_exit_2(home, tracking_uri):
    config = str(PROJECT / "configs/gates/country-facts.yaml")
    result = _gate(config, "--candidate", "country-facts/1", "--tracking-uri", tracking_uri)
    assert result.exit_code == 2
    assert "no registered adapter named 'country-facts'" in result.output
    result = _gate(config, "--candidate", "other/1", "--tracking-uri", tracking_uri)
    assert result.exit_code == 2
    assert "not a version of 'country-facts'" in result.output
    result = _gate(config, "--candidate", "country-facts/1", "--server", "localhost:8000/v1")
    assert result.exit_code == 2
    assert "--server: 'localhost:8000/v1': not an http(s) URL" in result.output


@pytest.mark.parametrize("name", ["construction-faq", "country-facts"])
def test_eval_set_holds_only_test_split_questions(name, smollm2):
    from eval.eval_set import build_eval_set, select_test_records
    from train.config import load_config
    from train.data import load_splits, to_messages

    gate = load_gate_config(PROJECT / f"configs/gates/{name}.yaml")
    splits = load_splits(load_config(gate.train_config).data)
    records = select_test_records(splits, gate.eval_set.max_samples)
    dims = 8  # a stand-in embedding: retrieval by token overlap is enough for this check
    embed = lambda texts: np.stack([_bag(t, dims) for t in texts])  # noqa: E731
    samples = build_eval_set(splits, records, gate.eval_set.context_field, 2, embed)

    trained = {to_messages(r, splits.format)[0]["content"] for r in splits.train}
    assert len(samples) == min(gate.eval_set.max_samples, len(splits.test))
    assert not {s.question for s in samples} & trained
    assert all(len(s.retrieved_contexts) == 2 for s in samples)


@pytest.mark.parametrize("context_field", ["context", None])
def test_records_with_no_answer_or_no_passage_are_left_out_of_the_eval_set(context_field):
    """Training skips a chat with no answer to a question; so does the eval set (it raised
    max() of an empty sequence), and a record with a null passage (the embedder raised)."""
    from datasets import Dataset

    from eval.eval_set import build_eval_set
    from train.data import SplitData

    def chat(context: str | None, **turns: str) -> dict:
        messages = [{"role": role, "content": text} for role, text in turns.items()]
        return {"messages": messages, "context": context}

    records = Dataset.from_list([
        chat("Oslo is Norway's capital.", system="Be brief.", user="Capital of Norway?",
             assistant="Oslo."),
        chat("Lima is Peru's capital.", system="Be brief.", user="Capital of Peru?"),
        chat(None, user="Capital of Chile?", assistant="Santiago."),
        chat("Madrid is Spain's capital.", assistant="Hello!"),
    ])  # fmt: skip
    splits = SplitData("chat", records.select([]), records.select([]), records)
    embed = lambda texts: np.stack([_bag(t, 8) for t in texts])  # noqa: E731
    samples = build_eval_set(splits, records, context_field, 5, embed)

    if context_field:
        assert [s.question for s in samples] == ["Capital of Norway?"]
        assert sorted(samples[0].retrieved_contexts) == sorted(
            ["Oslo is Norway's capital.", "Lima is Peru's capital.", "Madrid is Spain's capital."]
        )
    else:  # the answers are the passages
        assert [s.question for s in samples] == ["Capital of Norway?", "Capital of Chile?"]
        assert [s.reference_contexts for s in samples] == [["Oslo."], ["Santiago."]]
        assert sorted(samples[1].retrieved_contexts) == ["Oslo.", "Santiago."]
    assert samples[0].messages[-1] == {"role": "user", "content": "Capital of Norway?"}
    with pytest.raises(ConfigError, match="none of the 2 test records has a user question"):
        build_eval_set(splits, records.select([1, 3]), context_field, 5, embed)


def _bag(text: str, dims: int) -> np.ndarray:
    vector = np.ones(dims)
    for word in text.lower().split():
        vector[hash(word) % dims] += 1
    return vector / np.linalg.norm(vector)


# End to end: train a few steps, gate against the base, promote, then a degraded version fails.
E2E_GATE = """
eval_set: {max_samples: 8, context_field: context, top_k: 2}
generation: {max_tokens: 24}
bootstrap: {resamples: 500}
metrics:
  perplexity: {tolerance: 0.2}
  rouge_l: {tolerance: 0.05}
  semantic_similarity: {floor: 0.3, tolerance: 0.05}
  context_recall: {floor: 0.5}
"""


def _degrade(folder, dest, factor: float):
    """A copy of an adapter with every B matrix scaled: same shapes and lineage, worse model."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    scaled = {k: v * factor if "lora_B" in k else v for k, v in weights.items()}
    save_file(scaled, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.slow
def test_gate_passes_a_trained_adapter_promotes_it_and_fails_a_degraded_one(
    smollm2, home, tracking_uri, tmp_path
):
    result = CliRunner().invoke(
        app,
        ["train", str(TRAIN_CONFIG), "training.max_steps=8", "training.eval_steps=8",
         "data.split.validation=16", "--tracking-uri", tracking_uri],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    gate = str(_write_gate(tmp_path, E2E_GATE))
    registry = AdapterRegistry(tracking_uri, home)

    # Through a running `loraplex serve` on the same registry, which loads the candidate by
    # reference: the same measurements as the engine in the gate's own process (below).
    served = _gate_through_a_server(smollm2, tracking_uri, gate, tmp_path / "served")
    assert served.exit_code == 0, served.output

    result = _gate(gate, "--candidate", "country-facts/1", "--promote",
                   "--output", str(tmp_path / "v1"), "--tracking-uri", tracking_uri)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v1/report.json").read_text())
    assert report["result"] == "pass" and report["baseline"] == "base (no champion yet)"
    remote = json.loads((tmp_path / "served/report.json").read_text())
    assert remote["measured_on"].startswith("http://127.0.0.1")
    for metric, measured in report["metrics"].items():
        for model in ("candidate", "base"):
            assert remote["metrics"][metric][model] == pytest.approx(measured[model], rel=1e-4)
    ppl = report["metrics"]["perplexity"]
    assert ppl["candidate"] < ppl["base"]  # trained answers are likelier than the base's
    champion = registry.get(parse_ref("country-facts@champion"))
    assert champion.version == 1 and champion.tags["gate_result"] == "pass"
    run = registry.client.get_run(champion.run_id)
    assert run.data.metrics["gate_perplexity"] == pytest.approx(ppl["candidate"])

    # B scaled by -5: the learned update reversed and amplified (a larger positive factor can
    # even help an adapter trained only 8 steps).
    trained = registry.get(parse_ref("country-facts/1"))
    bad = _degrade(registry.fetch_version(trained), tmp_path / "bad", -5.0)
    params = registry.run_params(trained)  # its training's config, the split included
    assert register_folder(registry, bad, "country-facts", params) == 2
    result = _gate(gate, "--candidate", "country-facts/2", "--promote",
                   "--output", str(tmp_path / "v2"), "--tracking-uri", tracking_uri)  # fmt: skip
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "v2/report.json").read_text())
    assert report["baseline"] == "country-facts/1 (@champion)"
    assert "perplexity" in report["failed_metrics"]
    assert "regressed against the baseline" in (tmp_path / "v2/report.md").read_text()
    assert "FAIL" in result.output
    assert registry.get(parse_ref("country-facts@champion")).version == 1  # not promoted
    assert registry.get(parse_ref("country-facts/2")).tags["gate_result"] == "fail"


def _gate_through_a_server(smollm2, tracking_uri: str, gate: str, output):
    from serve import LLM
    from serve.async_engine import AsyncLLM
    from serve.server import create_app
    from tests.helpers import running_server

    method = load_config(TRAIN_CONFIG).quantization.method  # as the gate's own engine
    llm = LLM(
        base_model=str(smollm2.path),
        quantization=method,
        tracking_uri=tracking_uri,
    )
    engine = AsyncLLM(llm.engine)
    try:
        with running_server(create_app(engine, "smollm2")) as url:
            return _gate(gate, "--candidate", "country-facts/1", "--server", url,
                         "--output", str(output), "--tracking-uri", tracking_uri)  # fmt: skip
    finally:
        engine.shutdown()


def test_a_server_measures_as_the_engine_and_its_refusals_are_usage_errors(
    tiny_base, tracking_uri, tmp_path
):
    import socket

    from transformers import AutoTokenizer

    from eval.measure import EngineModels
    from eval.served import ServedModels
    from serve import LLM
    from serve.async_engine import AsyncLLM
    from serve.server import create_app
    from tests.helpers import running_server, tiny_engine_args

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    question = [[{"role": "user", "content": "What is the capital of Norway?"}]]
    prompts = [[1, 300, 301, 302], [1, 40, 41]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(UsageError, match="cannot connect"):
        ServedModels(nowhere, None, tokenizer, {}).answers(question, 4, [None])

    from tests.helpers import make_adapter

    registry = AdapterRegistry(tracking_uri)
    folder = make_adapter(tiny_base, tmp_path / "faq", name="faq")  # data hash "sha256:test"
    number = register_folder(registry, folder, "faq")
    version = registry.get(parse_ref(f"faq/{number}"))
    reference = EngineModels(LLM(**tiny_engine_args(tiny_base)))
    reference.llm.load_adapter("candidate", str(folder))
    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base, tracking_uri)).engine)
    missing = dataclasses.replace(version, name="country-facts", version=9)
    elsewhere = dataclasses.replace(version, tags={**version.tags, "data_hash": "sha256:other"})
    try:
        with running_server(create_app(engine, "tiny")) as url:
            served = ServedModels(url, None, tokenizer, {"candidate": version})
            scores = served.prompt_logprobs(prompts, [None, "candidate"])
            answers = served.answers(question, 6, [None])
            with pytest.raises(UsageError, match=r"404 .*country-facts"):
                ServedModels(url, None, tokenizer, {"candidate": missing}).answers(
                    question, 2, [None]
                )
            # The same name and version on the server's registry, trained on other data.
            with pytest.raises(UsageError, match="point the server and the gate at the same"):
                ServedModels(url, None, tokenizer, {"candidate": elsewhere}).answers(
                    question, 2, [None]
                )
    finally:
        engine.shutdown()
    expected = reference.prompt_logprobs(prompts, [None, "candidate"])
    assert [s[0] for s in scores] == [None, None]
    assert [s[1:] for s in scores] == [pytest.approx(e[1:], abs=1e-5) for e in expected]
    assert answers == reference.answers(question, 6, [None])


@pytest.mark.slow
def test_llm_judged_metrics_run_against_our_own_server_as_the_judge(smollm2):
    """RAGAS' judges ask for JSON under a schema; our server constrains decoding to it, so even
    a 135M judge answers parseably (whether it judges well is another matter)."""
    from eval.eval_set import EvalSample
    from eval.gate_config import JudgeConfig
    from eval.scores import Scorer
    from serve import LLM
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app
    from tests.helpers import running_server

    llm = LLM(base_model=str(smollm2.path), quantization=None)
    engine = AsyncLLM(llm.engine)
    passage = "Norway is a country in Northern Europe. Its capital is Oslo."
    sample = EvalSample([], "What is the capital of Norway?", "Oslo.", [passage], [passage])
    try:
        app = create_app(engine, "judge", ServeConfig(default_max_tokens=128))
        with running_server(app) as url:
            scorer = Scorer(JudgeConfig(base_url=url, model="judge"))
            [relevancy] = scorer.score("answer_relevancy", [sample], ["Oslo is the capital."])
            [faithful] = scorer.score("faithfulness", [sample], ["Oslo is the capital."])
    finally:
        engine.shutdown()
    assert 0.0 <= relevancy <= 1.0
    assert 0.0 <= faithful <= 1.0  # 0 where the judge found no statement


def test_a_gate_whose_adapter_is_not_its_train_configs_name_is_refused(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(
        f"adapter: construction-faq\ntrain_config: {TRAIN_CONFIG}\nmetrics: {{rouge_l: {{}}}}\n"
    )
    with pytest.raises(ConfigError, match=r"adapter: 'construction-faq' is not what") as error:
        load_gate_config(path)
    assert "name: 'country-facts'" in str(error.value)


def _register_trained(
    registry, data_hash: str, base="sha256:f", tokenizer=None, params=True, **split
) -> int:
    """A version as `loraplex train` leaves it: the data hash in its lineage, the resolved
    config (here only the split) as its run's params (none without `params`). No weights:
    the gate is not run."""
    from mlflow.entities import Param

    from registry.lineage import Lineage

    client = registry.client
    run_id = client.create_run(registry.experiment_id("tests")).info.run_id
    split = {"validation": 0.1, "test": 0.1, "seed": 0} | split
    if params:
        logged = [Param(f"data.split.{k}", str(v)) for k, v in split.items()]
        client.log_batch(run_id, params=logged)
    lineage = Lineage("country-facts", "b", base, data_hash, 4, 8.0, ["q_proj"], "0")
    lineage = dataclasses.replace(lineage, tokenizer=tokenizer or {})
    version = registry.register("country-facts", run_id, "file:///nowhere/adapter", lineage)
    return version.version


def _trained_hash() -> str:
    from train.data import data_hash

    return data_hash(load_config(TRAIN_CONFIG).data.path)


@pytest.mark.parametrize(
    ("data_hash", "split", "differs"),
    [
        ("sha256:older", {}, r"data hash: sha256:older when trained, sha256:\w+ in "),
        (None, {"seed": 1}, r"data\.split\.seed: 1 when trained, 0 in .*country-facts"),
        (None, {"test": 50.0}, r"data\.split\.test: 50\.0 when trained, 0\.1 in "),
        # a run that recorded no split: nothing shows the test records were kept out
        (None, {"params": False}, r"data\.split\.seed: not recorded when trained, 0 in "),
    ],
)
def test_a_candidate_trained_on_another_split_is_refused_naming_what_differs(
    registry, data_hash, split, differs
):
    from eval.gate import QualityGate

    _register_trained(registry, data_hash or _trained_hash(), **split)
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    with pytest.raises(UsageError, match="may have trained on its test records") as error:
        QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    assert error.value.exit_code == 2
    assert len(re.findall(differs, str(error.value))) == 1, str(error.value)


def test_a_champion_trained_on_other_data_is_a_note_in_the_report_not_a_refusal(registry):
    from eval.gate import QualityGate

    assert _register_trained(registry, "sha256:older") == 1
    registry.promote("country-facts", 1)
    # Another validation size keeps the same test records out of training: not a difference.
    assert _register_trained(registry, _trained_hash(), validation=16.0) == 2
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/2", tracking_uri=registry.tracking_uri)
    [note] = gate.notes
    assert note.startswith("baseline country-facts/1 was trained on another split")
    assert "may have seen test records: data hash: sha256:older when trained" in note


def test_a_champion_on_another_base_is_a_note_and_the_candidate_may_replace_it(registry):
    """A train config moved to a new base: the champion cannot be served on it, so the
    candidate is judged against its own base (and --promote may replace the champion) instead
    of every gate failing until someone moves the alias by hand."""
    from eval.gate import QualityGate

    assert _register_trained(registry, _trained_hash(), base="sha256:old") == 1
    registry.promote("country-facts", 1)
    assert _register_trained(registry, _trained_hash()) == 2
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/2", tracking_uri=registry.tracking_uri)
    assert gate.baseline is None
    [note] = gate.notes
    assert note.startswith("the champion country-facts/1 was trained on another base model")
    assert gate._baseline_label() == "base (country-facts/1, the champion, is on another base)"
    gate._check_promotable()  # not refused: the champion cannot be compared on this base
    with pytest.raises(UsageError, match=r"--baseline country-facts/1 was trained on another"):
        QualityGate(config, "country-facts/2", "country-facts/1", registry.tracking_uri)
    # Against another baseline on the new base, the report says whom a promotion replaces
    # (it named the baseline alone).
    assert _register_trained(registry, _trained_hash()) == 3
    gate = QualityGate(config, "country-facts/3", "country-facts/2", registry.tracking_uri)
    assert gate.baseline.version == 2
    [note] = gate.notes
    assert note.startswith("the champion country-facts/1 was trained on another base model")
    assert note.endswith("judged against country-facts/2 and its own base instead")


def test_a_champion_trained_with_another_chat_template_is_a_champion_on_another_base(
    registry,
):
    """The base folder's chat template edited between two trainings: one engine cannot serve
    both adapters (it refuses the older), so the champion is judged as on another base."""
    from eval.gate import QualityGate

    digests = {"vocabulary": "v", "special_tokens": "s", "chat_template": "old"}
    assert _register_trained(registry, _trained_hash(), tokenizer=digests) == 1
    registry.promote("country-facts", 1)
    edited = {**digests, "chat_template": "new"}
    assert _register_trained(registry, _trained_hash(), tokenizer=edited) == 2
    assert _register_trained(registry, _trained_hash()) == 3  # from before tokenizers were kept
    # a later release's part the champion did not record: no difference
    assert _register_trained(registry, _trained_hash(), tokenizer={**digests, "merges": "m"}) == 4
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/2", tracking_uri=registry.tracking_uri)
    assert gate.baseline is None
    [note] = gate.notes
    assert note.startswith(
        "the champion country-facts/1 was trained on another base model or tokenizer "
        "(the tokenizer's chat template), which this gate does not serve"
    ), note
    for same in ("country-facts/3", "country-facts/4"):
        gate = QualityGate(config, same, tracking_uri=registry.tracking_uri)
        assert gate.baseline.version == 1 and gate.notes == []


def test_report_notes_are_in_the_json_and_the_markdown(tmp_path):
    from eval.report import GateReport

    report = GateReport("a", "a/2", "a/1", "b", "here", 0, 0, {}, [], notes=["baseline a/1 ..."])
    report.write(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["notes"] == ["baseline a/1 ..."]
    assert "Notes:\n- baseline a/1 ...\n" in (tmp_path / "report.md").read_text()


def test_a_gate_that_cannot_reach_its_registry_exits_2_not_1(home, monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = str(PROJECT / "configs/gates/country-facts.yaml")
    result = _gate(config, "--candidate", "country-facts/1", "--tracking-uri", nowhere)
    assert result.exit_code == 2, result.output
    assert f"error: MLflow at {nowhere}: " in result.output


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        ([1.0, 1.0, *[float("nan")] * 6], MetricRule(ceiling=3.0)),  # NaN on most records
        ([10.0, float("inf"), 10.0, 10.0, 10.0], MetricRule(tolerance=0.2)),  # a -inf logprob
    ],
)
def test_a_candidate_with_non_finite_answer_likelihoods_fails_perplexity(values, rule):
    # A NaN or infinite NLL is the model broken on that record, not a sample a judge could
    # not score: it must not be averaged away (nor turn the interval into NaN).
    n = len(values)
    candidate = Samples(np.array(values), np.full(n, 5.0), exponent=True)
    base = Samples(np.full(n, 10.0), np.full(n, 5.0), exponent=True)
    verdict = judge("perplexity", rule, candidate, base, base, BOOT)
    assert not verdict.passed
    broken = sum(not np.isfinite(v) for v in values)
    assert f"{broken} of {n} samples have no finite value" in " ".join(verdict.reasons)


def test_report_json_writes_infinite_values_as_null(tmp_path):
    from eval.report import GateReport

    rule = MetricRule(ceiling=5.0)
    samples = Samples(np.array([10.0, np.inf]), np.array([5.0, 5.0]), exponent=True)
    verdict = judge("perplexity", rule, samples, None, None, BOOT)
    GateReport("a", "a/1", "base", "b", "here", 0, 2, {"perplexity": rule}, [verdict]).write(
        tmp_path
    )

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert report["metrics"]["perplexity"]["candidate"] is None
    assert report["result"] == "fail"


def test_an_empty_answer_scores_zero_on_judged_metrics_without_asking_the_judge(monkeypatch):
    from types import SimpleNamespace

    from eval.eval_set import EvalSample
    from eval.gate_config import JudgeConfig
    from eval.scores import Scorer

    passage = "Norway is a country in Northern Europe. Its capital is Oslo."
    sample = EvalSample([], "What is the capital of Norway?", "Oslo.", [passage], [passage])
    scorer = Scorer(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge"))
    # RAGAS itself raises on an empty response: one would stop the whole gate.
    assert scorer.score("faithfulness", [sample, sample], ["", "  "]) == [0.0, 0.0]

    asked = []

    class Judge:
        async def abatch_score(self, rows):
            asked.extend(rows)
            return [SimpleNamespace(value=0.5 + i / 10) for i in range(len(rows))]

    monkeypatch.setattr(Scorer, "_metric", lambda self, metric: Judge())
    scores = scorer.score("faithfulness", [sample] * 3, ["Oslo.", "", "Oslo is the capital."])
    assert scores == [0.5, 0.0, 0.6]
    assert [row["response"] for row in asked] == ["Oslo.", "Oslo is the capital."]
    assert all(row["retrieved_contexts"] == [passage] for row in asked)


def test_an_answer_the_judge_finds_no_statement_in_scores_zero_not_nan(monkeypatch):
    """RAGAS' faithfulness is NaN for an answer with no statement to check; skipped, an
    evasive candidate was judged on its few checkable answers alone (9 of 10 NaN: 1.0)."""
    from types import SimpleNamespace

    from eval.eval_set import EvalSample
    from eval.gate_config import JudgeConfig
    from eval.scores import Scorer

    class Judge:
        async def abatch_score(self, rows):
            return [SimpleNamespace(value=v) for v in (float("nan"), 0.8)]

    passage = "Norway is a country in Northern Europe. Its capital is Oslo."
    sample = EvalSample([], "Is Oslo the capital of Norway?", "Yes.", [passage], [passage])
    scorer = Scorer(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge"))
    monkeypatch.setattr(Scorer, "_metric", lambda self, metric: Judge())
    assert scorer.score("faithfulness", [sample] * 2, ["Yes.", "Oslo is the capital."]) == [
        0.0,
        0.8,
    ]


def test_a_judge_key_variable_that_is_not_set_is_refused_before_anything_runs(monkeypatch):
    from eval.gate_config import JudgeConfig
    from eval.scores import Scorer

    judge = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge", api_key_env="JUDGE_KEY")
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"judge\.api_key_env: the environment variable JUDGE_K"):
        Scorer(judge)  # it sent "unused" to the judge, after minutes of answering
    monkeypatch.setenv("JUDGE_KEY", "sk-1")
    assert Scorer(judge).judge_key == "sk-1"


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("metrics: {rouge_l: {floor: .nan}}", "  metrics.rouge_l.floor: Input should be a finite"),
        ("metrics: {perplexity: {ceiling: .nan}}", "  metrics.perplexity.ceiling: Input should"),
        ("metrics: {rouge_l: {tolerance: .inf}}", "  metrics.rouge_l.tolerance: Input should be"),
        ("metrics: {rouge_l: {floor: 30}}", "  metrics: rouge_l: floor 30 is outside"),
        (
            "metrics: {perplexity: {ceiling: 0.5}}",
            "  metrics: perplexity: ceiling 0.5",
        ),
        ("metrics: {chrf: {ceiling: 2}}", "  metrics: chrf: higher is better"),
        ("metrics: {answer_relevancy: {}}", "  metrics: ['answer_relevancy'] are LLM"),
        # ints are strict, as in the train and serve configs: true is no 1, 8.0 no 8
        ("metrics: {rouge_l: {}}\neval_set: {top_k: true}", "  eval_set.top_k: Input should"),
        ("metrics: {rouge_l: {tolerance: yes}}", "  metrics.rouge_l.tolerance: a number, not a b"),
        ("metrics: {rouge_l: {}}\neval_set: {max_samples: 8.0}", "  eval_set.max_samples: "),
        ("metrics: {rouge_l: {}}\neval_set: {max_samples: 4}", "  eval_set.max_samples: Input"),
        ("metrics: {rouge_l: {}}\nbootstrap: {seed: true}", "  bootstrap.seed: Input should"),
        ("metrics: {rouge_l: {}}\nbootstrap: {confidence: .nan}", "  bootstrap.confidence: "),
        ("metrics: {rouge_l: {}}\nbootstrap: {resamples: 1000000000}", "  bootstrap.resamples: "),
    ],
)
def test_gate_config_errors_name_their_key_and_refuse_bounds_that_cannot_work(tmp_path, body, line):
    with pytest.raises(ConfigError) as error:
        load_gate_config(_write_gate(tmp_path, body))
    assert line in str(error.value).splitlines()[1]
    assert "train_config" not in str(error.value)  # not the whole config echoed back


def test_a_bad_adapter_name_in_a_gate_config_is_named_as_the_adapter_key(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(
        f"adapter: Country Facts\ntrain_config: {TRAIN_CONFIG}\nmetrics: {{bleu: {{}}}}"
    )
    with pytest.raises(ConfigError) as error:
        load_gate_config(path)
    assert str(error.value).splitlines()[1].startswith("  adapter: name 'Country")
    assert "(got 'Country Facts')" in str(error.value)


def test_a_bad_eval_set_setting_fails_before_the_models_load(registry, monkeypatch):
    from eval.gate import QualityGate

    _register_trained(registry, _trained_hash())
    config = load_gate_config(
        PROJECT / "configs/gates/country-facts.yaml", ["eval_set.context_field=contxt"]
    )
    gate = QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)

    def load_models():
        raise AssertionError("the models loaded before the eval set was checked")

    monkeypatch.setattr(gate, "_models", load_models)
    with pytest.raises(ConfigError, match=r"eval_set\.context_field: no column 'contxt'"):
        gate.measure()


def test_promoting_against_a_baseline_other_than_the_champion_is_refused_unmeasured(
    registry, monkeypatch, tmp_path
):
    from eval.gate import QualityGate

    for _ in range(3):
        _register_trained(registry, _trained_hash())
    registry.promote("country-facts", 2)
    monkeypatch.setattr(QualityGate, "measure", lambda self: pytest.fail("measured"))
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/3", "country-facts/1", registry.tracking_uri)
    # Beating v1 says nothing about v2: promoting would replace v2 uncompared.
    with pytest.raises(UsageError, match=r"replace country-facts/2 \(@champion\) without") as e:
        gate.run(tmp_path, promote=True)
    assert e.value.exit_code == 2
    assert registry.get(parse_ref("country-facts@champion")).version == 2
    # The champion itself, gated against v1 with --promote, replaces nothing: it is measured.
    gate = QualityGate(config, "country-facts/2", "country-facts/1", registry.tracking_uri)
    with pytest.raises(pytest.fail.Exception, match="measured"):
        gate.run(tmp_path, promote=True)


@pytest.mark.parametrize("at_start", [1, None])
def test_a_champion_that_moves_while_the_gate_measures_is_not_replaced(
    registry, monkeypatch, tmp_path, at_start
):
    """Another gate promoted v3 meanwhile: v2 passed against the champion of the start (or
    the base), never against v3, so v3 stays; the report is still written and recorded."""
    from eval.gate import QualityGate
    from eval.report import GateReport

    for _ in range(3):
        _register_trained(registry, _trained_hash())
    if at_start:
        registry.promote("country-facts", at_start)
    report = GateReport("country-facts", "country-facts/2", "b", "b", "here", 0, 0, {}, [])

    def measure_while_v3_is_promoted(self):
        registry.promote("country-facts", 3)
        return report

    monkeypatch.setattr(QualityGate, "measure", measure_while_v3_is_promoted)
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/2", tracking_uri=registry.tracking_uri)
    was = "country-facts/1" if at_start else "none"
    with pytest.raises(UsageError, match=f"moved from {was} to country-facts/3 while") as e:
        gate.run(tmp_path, promote=True)
    assert e.value.exit_code == 2
    assert registry.get(parse_ref("country-facts@champion")).version == 3
    assert registry.get(parse_ref("country-facts/2")).tags["gate_result"] == "pass"
    assert (tmp_path / "report.md").is_file()


def test_an_output_folder_that_cannot_be_made_is_refused_before_measuring(
    registry, monkeypatch, tmp_path
):
    from eval.gate import QualityGate

    _register_trained(registry, _trained_hash())
    monkeypatch.setattr(QualityGate, "measure", lambda self: pytest.fail("measured"))
    (tmp_path / "a-file").write_text("")
    config = str(PROJECT / "configs/gates/country-facts.yaml")
    output = str(tmp_path / "a-file/reports")
    result = _gate(config, "--candidate", "country-facts/1", "--output", output,
                   "--tracking-uri", registry.tracking_uri)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--output" in result.output and "a-file/reports" in result.output


def test_a_gate_that_crashes_exits_2_and_moves_no_alias(registry, monkeypatch, tmp_path):
    from eval.gate import QualityGate

    _register_trained(registry, _trained_hash())
    _register_trained(registry, _trained_hash())
    registry.promote("country-facts", 1)

    def crash(self):
        raise RuntimeError("the engine died")

    monkeypatch.setattr(QualityGate, "measure", crash)
    config = str(PROJECT / "configs/gates/country-facts.yaml")
    result = _gate(config, "--candidate", "country-facts/2", "--promote",
                   "--output", str(tmp_path), "--tracking-uri", registry.tracking_uri)  # fmt: skip
    assert result.exit_code == 2, result.output  # not 1: that reads as a regression
    assert registry.get(parse_ref("country-facts@champion")).version == 1
    assert "gate_result" not in registry.get(parse_ref("country-facts/2")).tags


def test_the_run_gets_the_gate_report_alone_not_the_rest_of_the_output_folder(
    registry, monkeypatch, tmp_path
):
    from eval.gate import QualityGate
    from eval.report import GateReport

    _register_trained(registry, _trained_hash())
    report = GateReport("country-facts", "country-facts/1", "base", "b", "here", 0, 0, {}, [])
    monkeypatch.setattr(QualityGate, "measure", lambda self: report)
    (tmp_path / "notes.txt").write_text("someone's file beside the report (`--output .`)")
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    gate.run(tmp_path)
    logged = registry.client.list_artifacts(gate.candidate.run_id, "gate")
    assert sorted(a.path for a in logged) == ["gate/report.json", "gate/report.md"]
    assert (tmp_path / "report.md").is_file()


def test_the_champion_gated_again_is_compared_with_the_base_not_with_itself(
    registry, monkeypatch, tmp_path
):
    from eval.gate import QualityGate
    from eval.report import GateReport

    _register_trained(registry, _trained_hash())
    registry.promote("country-facts", 1)
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    for ref in ("country-facts/1", "country-facts@champion"):
        gate = QualityGate(config, ref, tracking_uri=registry.tracking_uri)
        assert gate.baseline is None  # its gain over itself is 0 whatever it is: no check at all
        assert gate._baseline_label() == "base (the candidate is the champion)", ref
    report = GateReport("country-facts", "country-facts/1", "base", "b", "here", 0, 0, {}, [])
    monkeypatch.setattr(QualityGate, "measure", lambda self: report)
    gate.run(tmp_path, promote=True)  # promoting the champion is no replacement: allowed
    assert registry.get(parse_ref("country-facts@champion")).version == 1


def test_the_gate_measures_the_base_quantized_as_its_train_config_trained_it(registry, monkeypatch):
    import serve.llm
    from eval.gate import QualityGate

    _register_trained(registry, _trained_hash())
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    single = gate.train.quantization.model_copy(update={"double_quant": False})
    gate.train = gate.train.model_copy(update={"quantization": single})
    built = []

    def engine(config):
        built.append(config)
        raise RuntimeError("stop before loading the model")

    monkeypatch.setattr(serve.llm, "LLMEngine", engine)
    with pytest.raises(RuntimeError, match="stop before"):
        gate._models()
    assert (built[0].quantization, built[0].double_quant) == ("nf4", False)


def test_a_test_split_with_no_answer_within_max_seq_length_is_a_usage_error_not_a_fail(
    registry, tokenizer, monkeypatch, tmp_path
):
    """Every prompt fills the train config's max_seq_length: nothing is scored, which is the
    data's or config's fault (exit 2, nothing recorded), not a regression of the candidate."""
    from eval.gate import QualityGate

    _register_trained(registry, _trained_hash())
    gate_file = tmp_path / "gate.yaml"
    gate_file.write_text(
        f"adapter: country-facts\ntrain_config: {TRAIN_CONFIG}\n"
        "metrics:\n  perplexity: {ceiling: 4.0}\n"
    )
    config = load_gate_config(gate_file)
    gate = QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    data = gate.train.data.model_copy(update={"max_seq_length": 16})
    monkeypatch.setattr(gate, "train", gate.train.model_copy(update={"data": data}))

    class Unscored:  # the models, never asked: no example keeps an answer token
        def prompt_logprobs(self, prompts, models):
            assert prompts == []
            return []

    unscored = Unscored()
    unscored.tokenizer = tokenizer
    monkeypatch.setattr(gate, "_models", lambda: (unscored, [None, "candidate"]))
    with pytest.raises(ConfigError, match=r"perplexity: 0 of the \d+ test records keep an"):
        gate.measure()


def test_an_eval_set_too_small_to_compare_is_a_usage_error_not_a_fail(registry, monkeypatch):
    """A RAGAS gate whose test records give 1 to 4 questions: each metric failed the
    candidate (exit 1) as too few to tell, for the data's shape."""
    from types import SimpleNamespace

    from eval import gate as gate_module

    _register_trained(registry, _trained_hash())
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    gate = gate_module.QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    monkeypatch.setattr(gate_module, "Scorer", lambda judge: SimpleNamespace(embed=None))
    monkeypatch.setattr(gate_module, "build_eval_set", lambda *args: ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"eval_set: 3 of the \d+ test records can be asked"):
        gate.measure()


def test_fewer_scorable_records_than_a_comparison_needs_is_a_usage_error_not_a_fail(
    registry, monkeypatch
):
    """1 to 4 records within max_seq_length: too few to compare (a fail, exit 1, blamed the
    candidate for the data's shape; none at all was already a usage error)."""
    from eval.gate import CANDIDATE, QualityGate

    _register_trained(registry, _trained_hash())
    config = load_gate_config(PROJECT / "configs/gates/country-facts.yaml")
    config = config.model_copy(update={"metrics": {"perplexity": config.metrics["perplexity"]}})
    gate = QualityGate(config, "country-facts/1", tracking_uri=registry.tracking_uri)
    few = Samples(np.ones(MIN_PAIRS - 1), np.ones(MIN_PAIRS - 1), exponent=True)
    monkeypatch.setattr(gate, "_models", lambda: (None, [None, CANDIDATE]))
    monkeypatch.setattr(gate, "_perplexity", lambda *args: {None: few, CANDIDATE: few})
    with pytest.raises(ConfigError, match=rf"perplexity: {MIN_PAIRS - 1} of the \d+ test rec"):
        gate.measure()

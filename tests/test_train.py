"""`loraplex train` end to end: real SmolLM2 base, MLflow, the registry, interrupt and resume."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess

import pytest
from typer.testing import CliRunner

from registry.app import app
from registry.base_model import tokenizer_digests
from registry.errors import NotFoundError
from registry.lineage import Lineage, tokenizer_from_tags
from registry.refs import parse_ref
from registry.store import AdapterRegistry
from tests.helpers import BIN, PROJECT, run_cli

CONFIG = str(PROJECT / "configs/train/country-facts_smollm2-135m_qlora_cpu.yaml")
QUESTION = [{"role": "user", "content": "What is the capital of Norway?"}]


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.slow
def test_train_register_promote_download_and_generate_on_the_4bit_base(
    smollm2, home, tracking_uri, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _invoke(
        "train",
        CONFIG,
        "training.max_steps=8",
        "training.eval_steps=8",
        "training.logging_steps=2",
        "data.split.validation=32",
        "--tracking-uri",
        tracking_uri,
    )
    registry = AdapterRegistry(tracking_uri, home)
    version = registry.get(parse_ref("country-facts"))
    assert version.version == 1
    assert version.tags["base_fingerprint"] == smollm2.fingerprint
    assert version.tags["rank"] == "16"
    assert version.tags["target_modules"].split(",") == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert version.tags["data_hash"].startswith("sha256:")
    assert version.tags["loraplex_version"] == "0.1.0"

    run = registry.client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval_loss"] < run.data.metrics["base_loss"]
    assert run.data.params["lora.r"] == "16"
    assert run.data.params["training.max_steps"] == "8"
    losses = registry.client.get_metric_history(version.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6, 8]
    artifacts = {a.path for a in registry.client.list_artifacts(version.run_id, "adapter")}
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/loraplex.json",
    } <= artifacts

    _invoke("registry", "promote", "country-facts", "1", "--tracking-uri", tracking_uri)
    dest = tmp_path / "champion"
    _invoke(
        "registry", "download", "country-facts@champion", str(dest), "--tracking-uri", tracking_uri
    )

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    lineage = Lineage.read(dest)
    assert lineage.tokenizer == tokenizer_digests(tokenizer)
    assert tokenizer_from_tags(version.tags) == lineage.tokenizer
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        smollm2.path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, dest)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tuned = model(ids).logits[0, -1]
        with model.disable_adapter():
            plain = model(ids).logits[0, -1]
    assert not torch.allclose(tuned, plain, atol=1e-3)  # the adapter is applied
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip()


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_and_resume_continues_from_its_step(
    tiny_base, home, tracking_uri, tmp_path
):
    args = [
        "train",
        CONFIG,
        f"base_model={tiny_base.path}",
        "lora.r=4",
        "training.batch_size=2",
        "training.max_steps=300",
        "training.logging_steps=1",
        "training.eval_steps=1000",
        "training.save_steps=1000",
        "data.split.validation=8",
        "--tracking-uri",
        tracking_uri,
    ]
    log = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "loraplex"), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=PROJECT,
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 3/300"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130, "".join(output)
    assert "nothing registered" in "".join(output)
    registry = AdapterRegistry(tracking_uri, home)
    with pytest.raises(NotFoundError):
        registry.get(parse_ref("country-facts"))
    [run_dir] = [
        d
        for d in (home.runs / "country-facts").iterdir()
        if (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())
    ]
    [checkpoint] = (run_dir / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("checkpoint-"))
    assert 3 <= stopped_at < 300

    [hint] = [line for line in output if line.startswith("resume with: ")]
    command = shlex.split(hint.removeprefix("resume with: "))
    assert command[0] == "loraplex" and "--resume" in command
    result = run_cli(*command[1:])  # as printed, overrides included
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint-{stopped_at}" in result.stderr  # the resume log line
    version = registry.get(parse_ref("country-facts"))
    steps = [m.step for m in registry.client.get_metric_history(version.run_id, "loss")]
    assert steps == list(range(1, 301))  # one run: interrupted part, then the rest, no repeats


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_paged_8bit_optimizer_is_bitsandbytes_and_trains_the_adapter(tiny_base, home, tracking_uri):
    import bitsandbytes as bnb
    import torch

    from train.config import load_config
    from train.recipe import TrainingJob

    overrides = [
        f"base_model={tiny_base.path}",
        "lora.r=4",
        "training.batch_size=2",
        "training.max_steps=3",
        "training.eval_steps=1000",
        "data.split.validation=4",
        "training.optimizer=paged_adamw_8bit",
    ]
    job = TrainingJob(load_config(CONFIG, overrides), tracking_uri=tracking_uri, home=home)
    result = job.run()
    assert result.status == "finished"
    optimizer = job.trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.AdamW)
    assert (optimizer.args.optim_bits, optimizer.is_paged) == (8, True)
    assert optimizer.state  # it has stepped
    lora_b = [p for n, p in job.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) for p in lora_b)  # B starts at zero
    assert result.version.version == 1


def test_the_base_evaluation_leaves_the_4bit_base_differentiable(tiny_base, home, tracking_uri):
    """bitsandbytes would switch its 4-bit layers to a kernel without a backward after an
    eval-mode forward on an AVX512-BF16 CPU (this machine's kind; elsewhere this passes
    either way): the gradients after the base evaluation must equal those before it."""
    import torch

    from train.config import load_config
    from train.recipe import TrainingJob

    overrides = [f"base_model={tiny_base.path}", "lora.r=4", "lora.dropout=0"]
    job = TrainingJob(load_config(CONFIG, overrides), tracking_uri=tracking_uri, home=home)
    job.setup()
    model = job.model
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what the base evaluation runs first
    after = lora_grads()
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_resume_with_nothing_to_resume_is_refused(tiny_base, tracking_uri):
    result = CliRunner().invoke(
        app,
        [
            "train",
            CONFIG,
            "name=never-trained",
            f"base_model={tiny_base.path}",
            "--resume",
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 2
    assert "no unfinished run of 'never-trained'" in result.output


def test_train_summary_ends_with_the_registered_ref_on_one_line(capsys):
    from types import SimpleNamespace

    from registry.store import AdapterVersion
    from train.cli import _print_summary

    version = AdapterVersion("x" * 90, 12, "source", "r")  # longer than a terminal's width
    metrics = {"eval_loss": 1.0, "eval_perplexity": 2.7}
    _print_summary(SimpleNamespace(metrics=metrics, version=version, adapter_dir="a", run_id="r"))
    assert capsys.readouterr().out.splitlines()[-1] == f"registered: {'x' * 90}/12"


@pytest.mark.parametrize(
    ("changed", "then", "what"),
    [
        ("data_hash", "sha256:then", r"the data's hash \(sha256:then then, \S+ now\)"),
        (
            "base_fingerprint",
            "sha256:then",
            r"the base's fingerprint \(sha256:then then, \S+ now\)",
        ),
        (
            "tokenizer",
            {"chat_template": "then", "merges": "x"},
            "the base tokenizer's chat template",
        ),
    ],
)
def test_resume_refuses_a_run_whose_data_or_base_changed_since(
    tiny_base, home, tracking_uri, changed, then, what
):
    """Same config, other contents: the data file or the base folder was rewritten in place
    (a tokenizer part the record has and this release does not, `merges`, is no difference)."""
    from registry.errors import UsageError
    from train.config import load_config
    from train.recipe import TrainingJob

    config = load_config(CONFIG, [f"name=resume-{changed}", f"base_model={tiny_base.path}"])
    _interrupted_run(home, config, tiny_base, **{changed: then})
    job = TrainingJob(config, tracking_uri=tracking_uri, resume=True, home=home)
    with pytest.raises(UsageError, match=rf"--resume: {what} differ from the interrupted run"):
        job.setup()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b'{"run_id": "r", "status": "runn', r"Unterminated string"),  # written in place
        (b"[1, 2]", r"no run_id, status, config"),
        (b'{"run_id": 7, "status": "interrupted", "config": {}}', r"no run_id\)"),
        (b'{"run_id": "\xff"}', "can't decode byte 0xff"),
    ],
    ids=["truncated", "a-list", "run-id-a-number", "not-utf-8"],
)
def test_resume_over_a_record_that_is_no_record_names_the_file(
    tiny_base, home, tracking_uri, text, why, request
):
    from registry.errors import UsageError
    from train.config import load_config
    from train.recipe import TrainingJob
    from train.run_folder import RUN_FILE

    name = f"name=resume-{request.node.callspec.id}"  # the home is the module's
    config = load_config(CONFIG, [name, f"base_model={tiny_base.path}"])
    _interrupted_run(home, config, tiny_base)
    [run_dir] = (home.runs / config.name).iterdir()
    (run_dir / RUN_FILE).write_bytes(text)
    job = TrainingJob(config, tracking_uri=tracking_uri, resume=True, home=home)
    with pytest.raises(UsageError, match=rf"{run_dir / RUN_FILE}: not a run record \(.*{why}"):
        job.setup()


def test_a_run_record_is_replaced_whole(tmp_path, monkeypatch):
    """A job killed while writing its record leaves the one before, which --resume reads."""
    import json

    from train import run_folder

    run_folder.write_record(tmp_path, {"run_id": "r", "status": "running", "config": {}})

    def killed(*args):  # the process dies once the new text is written, before it counts
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_folder.write_record(tmp_path, {"run_id": "r", "status": "finished", "config": {}})
    monkeypatch.undo()
    assert run_folder.read_record(tmp_path)["status"] == "running"
    assert json.loads((tmp_path / run_folder.RUN_FILE).read_text())["status"] == "running"


def _interrupted_run(home, config, base, **record_changes) -> None:
    """The record an interrupted run of `config` over `base` leaves, as `--resume` reads it."""
    import json

    from train.data import data_hash
    from train.run_folder import RUN_FILE

    record = {
        "run_id": "r",
        "status": "interrupted",
        "data_hash": data_hash(config.data.path),
        "base_fingerprint": base.fingerprint,
        "config": config.model_dump(mode="json"),
    } | record_changes
    run_dir = home.runs / config.name / "20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_FILE).write_text(json.dumps(record))


def _tiny_job(tiny_base, home, tracking_uri, *overrides: str, resume: bool = False):
    from train.config import load_config
    from train.recipe import TrainingJob

    base = [
        f"base_model={tiny_base.path}",
        "lora.r=4",
        "training.batch_size=2",
        "training.max_steps=2",
        "training.eval_steps=1000",
        "data.split.validation=4",
    ]
    config = load_config(CONFIG, [*base, *overrides])
    return TrainingJob(config, tracking_uri=tracking_uri, resume=resume, home=home)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.alpha=.inf", "lora.alpha"),
        ("lora.alpha=1e400", "lora.alpha"),
        ("training.weight_decay=.inf", "training.weight_decay"),
        ("training.max_grad_norm=.nan", "training.max_grad_norm"),
    ],
)
def test_a_float_that_is_not_finite_is_refused_naming_its_key(override, key):
    from registry.errors import ConfigError
    from train.config import load_config

    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        load_config(CONFIG, [override])


def test_an_empty_experiment_name_is_refused_naming_the_key():
    from registry.errors import ConfigError
    from train.config import load_config

    with pytest.raises(ConfigError, match=r"experiment: String should have at least 1 char"):
        load_config(CONFIG, ["experiment="])


def test_training_seed_decides_the_adapters_initial_weights(tiny_base, home, tracking_uri):
    """The Trainer seeds only after the model exists: LoRA's random A must follow training.seed,
    not whatever the process drew before."""
    import torch

    def initial_lora_a(seed: int) -> torch.Tensor:
        torch.rand(7)  # another state of the global generator, as another process has
        job = _tiny_job(tiny_base, home, tracking_uri, "name=seeded", f"training.seed={seed}")
        job.setup()
        return next(p for n, p in job.model.named_parameters() if "lora_A" in n).detach()

    first = initial_lora_a(0)
    torch.testing.assert_close(initial_lora_a(0), first, rtol=0, atol=0)
    assert not torch.equal(initial_lora_a(1), first)


def test_resume_refuses_changed_training_settings_naming_each_key(tiny_base, home, tracking_uri):
    """A checkpoint's scheduler would keep the old learning rate unseen, and the run's MLflow
    params (logged once) would misreport a new max_steps."""
    from registry.errors import UsageError

    then = _tiny_job(tiny_base, home, tracking_uri, "name=resume-changed").config
    _interrupted_run(home, then, tiny_base)
    now = ["name=resume-changed", "training.learning_rate=0.01", "training.max_steps=9"]
    job = _tiny_job(tiny_base, home, tracking_uri, *now, resume=True)
    expected = (
        r"--resume: training\.learning_rate \(0\.0005 then, 0\.01 now\), "
        r"training\.max_steps \(2 then, 9 now\) differ from the interrupted run"
    )
    with pytest.raises(UsageError, match=expected):
        job.setup()


@pytest.mark.parametrize("stage", ["building the trainer", "uploading the adapter"])
def test_a_failure_after_the_mlflow_run_opens_marks_it_failed_and_registers_nothing(
    tiny_base, home, tracking_uri, monkeypatch, stage
):
    import json

    from train.recipe import TrainingJob
    from train.run_folder import RUN_FILE

    def fail(*args, **kwargs):
        raise OSError(f"failed while {stage}")

    job = _tiny_job(tiny_base, home, tracking_uri, "name=failing")
    if stage == "building the trainer":
        monkeypatch.setattr(TrainingJob, "_trainer", fail)
    else:
        monkeypatch.setattr(job.registry.client, "log_artifacts", fail)
    with pytest.raises(OSError, match=stage):
        job.run()
    assert job.registry.client.get_run(job.run_id).info.status == "FAILED"
    assert json.loads((job.run_dir / RUN_FILE).read_text())["status"] == "failed"
    assert not job.registry.client.search_registered_models()


def test_a_run_whose_adapter_diverged_to_nan_registers_nothing(
    tiny_base, home, tracking_uri, monkeypatch
):
    import torch

    from registry.errors import LoraplexError
    from train.recipe import TrainingJob

    train = TrainingJob.train

    def train_then_diverge(self):
        finished = train(self)
        with torch.no_grad():
            next(p for n, p in self.model.named_parameters() if "lora_B" in n).fill_(torch.nan)
        return finished

    monkeypatch.setattr(TrainingJob, "train", train_then_diverge)
    job = _tiny_job(tiny_base, home, tracking_uri, "name=diverged")
    with pytest.raises(LoraplexError, match=r"training diverged: 1 adapter weights \(first "):
        job.run()
    assert job.registry.client.get_run(job.run_id).info.status == "FAILED"
    assert not job.registry.client.search_registered_models()


def test_warmup_with_the_constant_schedule_is_refused_not_ignored():
    from registry.errors import ConfigError
    from train.config import load_config

    with pytest.raises(ConfigError, match=r"training\.warmup_steps: lr_scheduler "):
        load_config(CONFIG, ["training.lr_scheduler=constant"])  # the YAML warms up 5 steps
    config = load_config(CONFIG, ["training.lr_scheduler=constant", "training.warmup_steps=0"])
    assert config.training.lr_scheduler == "constant"
    training = load_config(CONFIG, ["training.lr_scheduler=constant_with_warmup"]).training
    assert (training.lr_scheduler, training.warmup_steps) == ("constant_with_warmup", 5)


def test_resuming_a_run_that_failed_after_its_last_step_trains_no_step_more(
    tiny_base, home, tracking_uri, monkeypatch
):
    """Its checkpoint at max_steps holds every step: the Trainer, resumed from it, ran a
    step past max_steps and that adapter was registered."""
    from safetensors.torch import load_file

    overrides = ("name=reupload", "training.max_steps=4", "training.save_steps=2")
    job = _tiny_job(tiny_base, home, tracking_uri, *overrides, "training.logging_steps=1")

    def unreachable(*args, **kwargs):
        raise OSError("tracking server unreachable")

    monkeypatch.setattr(job.registry.client, "log_artifacts", unreachable)
    with pytest.raises(OSError, match="unreachable"):
        job.run()
    monkeypatch.undo()
    trained = load_file(job.run_dir / "checkpoints/checkpoint-4/adapter_model.safetensors")

    resumed = _tiny_job(
        tiny_base, home, tracking_uri, *overrides, "training.logging_steps=1", resume=True
    )
    result = resumed.run()
    assert result.status == "finished" and resumed.trainer.state.global_step == 4
    registered = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert registered.keys() == trained.keys()
    assert all(registered[k].equal(trained[k]) for k in trained)
    client = resumed.registry.client
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(result.run_id, "base_loss")] == [0]


def test_the_eval_loss_is_a_mean_per_answer_token_whatever_the_batch_size(
    tiny_base, home, tracking_uri
):
    """The Trainer's own is a mean of batch means: 4 examples in batches of 3 weighed the
    last one as much as the other three."""
    import torch

    losses = []
    for size in (1, 3):
        job = _tiny_job(tiny_base, home, tracking_uri, f"training.eval_batch_size={size}")
        job.setup()
        losses.append(job.trainer.evaluate()["eval_loss"])
    total = count = 0
    with torch.no_grad():
        for row in job.eval_data:
            labels = torch.tensor([row["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            ids = torch.tensor([row["input_ids"]])
            total += float(job.model(input_ids=ids, labels=labels).loss) * tokens
            count += tokens
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1] == pytest.approx(total / count, rel=1e-5)


def test_how_often_a_run_evaluates_does_not_change_the_adapter_it_trains(
    tiny_base, home, tracking_uri
):
    """Iterating the eval set drew from torch's global generator, which moved the dropout
    masks of every later step."""
    weights, evaluated = [], []
    for every in (1, 1000):
        job = _tiny_job(
            tiny_base, home, tracking_uri, "training.max_steps=3", f"training.eval_steps={every}"
        )
        result = job.run()
        weights.append(
            {n: p.detach().clone() for n, p in job.model.named_parameters() if "lora" in n}
        )
        history = job.registry.client.get_metric_history(result.run_id, "eval_loss")
        evaluated.append({m.step for m in history})
    assert {1, 2} <= evaluated[0] and not {1, 2} & evaluated[1]  # it did evaluate between steps
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][n].equal(weights[1][n]) for n in weights[0])


def test_a_run_resumed_after_a_crash_logs_each_step_once(
    tiny_base, home, tracking_uri, monkeypatch
):
    """It replays the steps after its checkpoint, which the crashed attempt had logged."""
    from train.callbacks import MlflowMetrics

    overrides = ("name=crashed", "training.max_steps=4", "training.save_steps=2")
    job = _tiny_job(tiny_base, home, tracking_uri, *overrides, "training.logging_steps=1")
    log = MlflowMetrics.on_log

    def crash_after_step_3(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs, **kwargs)
        if state.global_step == 3:
            raise RuntimeError("killed")

    monkeypatch.setattr(MlflowMetrics, "on_log", crash_after_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        job.run()
    monkeypatch.undo()
    resumed = _tiny_job(
        tiny_base, home, tracking_uri, *overrides, "training.logging_steps=1", resume=True
    )
    result = resumed.run()
    client = resumed.registry.client
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == [1, 2, 3, 4]


def test_ctrl_c_in_the_last_step_finishes_and_registers_the_run(
    tiny_base, home, tracking_uri, monkeypatch
):
    """Every step had run: it was reported interrupted, and its resume trained one more."""
    from train.callbacks import GracefulInterrupt
    from train.run_folder import read_record

    step_end = GracefulInterrupt.on_step_end

    def ctrl_c_in_the_last_step(self, args, state, control, **kwargs):
        self.requested = self.requested or state.global_step == state.max_steps
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(GracefulInterrupt, "on_step_end", ctrl_c_in_the_last_step)
    job = _tiny_job(tiny_base, home, tracking_uri, "name=last-step")
    result = job.run()
    assert job.interrupt.requested  # Ctrl-C came, in the last step
    assert result.status == "finished" and job.trainer.state.global_step == 2
    assert result.version.name == "last-step"
    assert read_record(job.run_dir)["status"] == "finished"


def test_examples_packed_in_one_row_do_not_attend_to_each_other(tiny_base, home, tracking_uri):
    """A packed batch's loss is that of its examples, each read alone: with a plain causal mask
    over the row, every example after the first also read the ones before it."""
    import torch

    job = _tiny_job(tiny_base, home, tracking_uri, "data.packing=true", "data.max_seq_length=256")
    job.setup()
    row = job.train_data[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0 and i > 0]
    assert len(starts) >= 2  # several examples in the row
    job.model.eval()
    with torch.no_grad():
        packed = job.model(**job.trainer.data_collator([row]))
        total = count = 0
        for lo, hi in zip([0, *starts], [*starts, len(row["input_ids"])], strict=True):
            labels = torch.tensor([row["labels"][lo:hi]])
            tokens = int((labels[:, 1:] != -100).sum())
            if tokens:
                ids = torch.tensor([row["input_ids"][lo:hi]])
                total += float(job.model(input_ids=ids, labels=labels).loss) * tokens
                count += tokens
    assert float(packed.loss) == pytest.approx(total / count, rel=1e-5)
    # whole examples: a row's every segment opens at its example's first token
    assert all(job.train_data[i]["position_ids"][0] == 0 for i in range(len(job.train_data)))


def test_the_tokens_seen_of_packed_rows_are_theirs_without_padding(tiny_base, home, tracking_uri):
    """Sent without an attention mask, they were counted as the tokens unlike the pad id: a
    real end of turn (EOS, SmolLM2's pad) was left out."""
    job = _tiny_job(tiny_base, home, tracking_uri, "data.packing=true", "data.max_seq_length=256")
    job.setup()
    rows = [job.train_data[i] for i in range(4)]
    trainer = job.trainer
    seen = trainer.state.num_input_tokens_seen
    trainer._track_num_input_tokens(trainer.data_collator(rows))
    assert trainer.state.num_input_tokens_seen - seen == sum(len(r["input_ids"]) for r in rows)


def test_epochs_train_that_many_passes_over_the_rows(tiny_base, home, tracking_uri, tmp_path):
    """1.5 epochs of 14 training records in batches of 2: 7 steps an epoch, 11 in all (the
    half epoch rounded up); no max_steps given, none of its default 100."""
    from mlflow import MlflowClient

    lines = (PROJECT / "configs/data/country-facts.jsonl").read_text().splitlines()[:20]
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    job = _tiny_job(
        tiny_base,
        home,
        tracking_uri,
        f"data.path={data}",
        "data.split.test=2",
        "training.max_steps=null",
        "training.epochs=1.5",
        "name=epochs",
    )
    result = job.run()
    assert len(job.train_data) == 14
    assert job.trainer.state.global_step == 11 and result.status == "finished"
    params = MlflowClient(tracking_uri).get_run(result.run_id).data.params
    assert (params["training.steps"], params["training.epochs"]) == ("11", "1.5")
    assert params["training.max_steps"] == "None"


@pytest.mark.parametrize(("epochs", "steps"), [(1.1, 55), (0.14, 7), (3, 150), (0.001, 1)])
def test_epochs_count_whole_steps_without_float_noise(epochs, steps):
    """400 rows in batches of 8: 50 steps an epoch; 1.1 of them is 55 steps, not 56."""
    from types import SimpleNamespace

    from train.config import load_config
    from train.recipe import TrainingJob

    overrides = ["training.max_steps=null", f"training.epochs={epochs}", "training.batch_size=8"]
    job = SimpleNamespace(config=load_config(CONFIG, overrides))
    assert TrainingJob._max_steps(job, 400) == steps


@pytest.mark.filterwarnings("error:torch.utils.checkpoint")  # the reentrant one is deprecated
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_gradient_checkpointing_trains_the_same_adapter(
    tiny_base, home, tracking_uri, quantization
):
    """It recomputes activations in the backward pass; the gradients into LoRA, and so the
    adapter, must be those of a run that keeps them (dropout's masks replayed)."""
    weights = []
    for checkpointing in ("false", "true"):
        job = _tiny_job(
            tiny_base,
            home,
            tracking_uri,
            f"quantization.method={quantization}",
            f"training.gradient_checkpointing={checkpointing}",
        )
        job.run()
        assert job.model.is_gradient_checkpointing == (checkpointing == "true")
        lora = {n: p.detach().clone() for n, p in job.model.named_parameters() if "lora" in n}
        weights.append(lora)
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][n].equal(weights[1][n]) for n in weights[0])
    assert any(w.any() for n, w in weights[0].items() if "lora_B" in n)  # it trained


def test_the_run_record_on_disk_holds_no_password_of_the_tracking_server(
    tiny_base, home, mlflow_server, monkeypatch
):
    """run.json kept the tracking URI as given, a team server's basic-auth password too."""
    import json

    from train.recipe import TrainingJob
    from train.run_folder import RUN_FILE

    def fail(*args, **kwargs):
        raise OSError("stop after the run record is written")

    with_password = mlflow_server.replace("http://", "http://alice:s3cret@")
    job = _tiny_job(tiny_base, home, with_password, "name=secretive")
    monkeypatch.setattr(TrainingJob, "_trainer", fail)
    with pytest.raises(OSError, match="stop after"):
        job.run()
    record = (job.run_dir / RUN_FILE).read_text()
    assert json.loads(record)["tracking_uri"].startswith("http://alice:***@127.0.0.1:")
    assert "s3cret" not in record


def test_a_failure_between_opening_the_run_and_recording_it_marks_it_failed(
    tiny_base, home, tracking_uri, monkeypatch
):
    """The run existed in MLflow before `run_id` was set: a failure logging its params left
    it RUNNING for good, with no run.json for --resume to find."""
    from train.run_folder import read_record

    job = _tiny_job(tiny_base, home, tracking_uri, "name=params-fail")

    def fail(*args, **kwargs):
        raise OSError("the store went away")

    monkeypatch.setattr(job.registry.client, "log_batch", fail)
    with pytest.raises(OSError, match="the store went away"):
        job.run()
    assert job.registry.client.get_run(job.run_id).info.status == "FAILED"
    assert read_record(job.run_dir)["status"] == "failed"


def test_a_run_file_that_cannot_be_written_still_leaves_the_mlflow_run_failed(
    tiny_base, home, tracking_uri, monkeypatch
):
    """A full disk (often why training failed) made recording the failure in run.json raise
    before MLflow was told: the run stayed RUNNING."""
    from train.recipe import TrainingJob

    job = _tiny_job(tiny_base, home, tracking_uri, "name=disk-full")

    def trainer_fails(self):
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(TrainingJob, "_trainer", trainer_fails)
    write = TrainingJob._write_run_file

    def no_space(self, run_id, status):
        if status == "failed":
            raise OSError("[Errno 28] No space left on device")
        write(self, run_id, status)

    monkeypatch.setattr(TrainingJob, "_write_run_file", no_space)
    with pytest.raises(OSError, match="No space left"):
        job.run()
    assert job.registry.client.get_run(job.run_id).info.status == "FAILED"


def test_a_failure_marking_the_run_failed_leaves_the_original_error(
    tiny_base, home, tracking_uri, monkeypatch
):
    """MLflow itself failing: recording the failure raised too, and replaced the error."""
    from train.recipe import TrainingJob
    from train.run_folder import read_record

    job = _tiny_job(tiny_base, home, tracking_uri, "name=both-fail")

    def trainer_fails(self):
        raise OSError("the real error")

    def store_fails(*args, **kwargs):
        raise ConnectionError("and MLflow is down")

    monkeypatch.setattr(TrainingJob, "_trainer", trainer_fails)
    monkeypatch.setattr(job.registry.client, "set_terminated", store_fails)
    with pytest.raises(OSError, match="the real error"):
        job.run()
    assert read_record(job.run_dir)["status"] == "failed"


def test_a_setup_that_fails_before_the_run_opens_leaves_no_run_folder(
    tiny_base, home, tracking_uri, monkeypatch
):
    from registry.errors import ConfigError
    from train import recipe

    def bad_data(*args, **kwargs):
        raise ConfigError("data.path: no example has an answer")

    monkeypatch.setattr(recipe, "load_splits", bad_data)
    job = _tiny_job(tiny_base, home, tracking_uri, "name=bad-data")
    with pytest.raises(ConfigError, match="no example has an answer"):
        job.run()
    assert not list((home.runs / "bad-data").iterdir())


def test_a_run_another_job_is_training_is_not_resumed(tiny_base, home, tracking_uri):
    """Two jobs on one run folder: each deleted the other's checkpoints and logged into one
    MLflow run."""
    from filelock import FileLock

    from registry.errors import UsageError
    from train.config import load_config
    from train.recipe import TrainingJob
    from train.run_folder import LOCK_FILE

    config = load_config(CONFIG, ["name=resume-busy", f"base_model={tiny_base.path}"])
    _interrupted_run(home, config, tiny_base, tracking_uri=tracking_uri)
    [run_dir] = (home.runs / config.name).iterdir()
    (run_dir / "checkpoints").mkdir()
    job = TrainingJob(config, tracking_uri=tracking_uri, resume=True, home=home)
    busy = pytest.raises(UsageError, match="is in use by another `loraplex train`")
    with FileLock(run_dir / LOCK_FILE), busy:  # the other job, still training
        job.setup()


def test_resume_against_another_mlflow_store_is_refused_naming_both(tiny_base, home, tracking_uri):
    from registry.errors import UsageError
    from train.config import load_config
    from train.recipe import TrainingJob

    config = load_config(CONFIG, ["name=resume-elsewhere", f"base_model={tiny_base.path}"])
    _interrupted_run(home, config, tiny_base, tracking_uri="http://mlflow.example:5000")
    job = TrainingJob(config, tracking_uri=tracking_uri, resume=True, home=home)
    with pytest.raises(UsageError, match=r"in the MLflow store http://mlflow\.example:5000, not "):
        job.setup()


def test_two_runs_started_in_one_second_get_a_folder_each(tmp_path, monkeypatch):
    """Made, not checked then made: a folder another job made between the two is skipped."""
    from pathlib import Path

    from train import run_folder

    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20260101-000000")
    (tmp_path / "runs" / "20260101-000000").mkdir(parents=True)  # the other job's
    monkeypatch.setattr(Path, "exists", lambda self: False)  # made after this one looked
    made = [run_folder.new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert [d.name for d in made] == [f"20260101-000000{'-1' * n}" for n in (1, 2, 3)]
    assert all((d / "checkpoints").is_dir() for d in made)


def test_a_path_under_an_unknown_users_home_is_a_config_error_naming_it(tmp_path):
    """`~nosuchuser/...` in a YAML, a base or an adapter source: a traceback."""
    from registry.base_model import resolve_base_model
    from registry.errors import ConfigError
    from train.config import load_config

    config = tmp_path / "train.yaml"
    config.write_text((PROJECT / CONFIG).read_text().replace("path: ", "path: ~nosuchuser/", 1))
    with pytest.raises(ConfigError, match=r"train\.yaml: '~nosuchuser/.*': Could not determine"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"base_model: '~nosuchuser/m'"):
        resolve_base_model("~nosuchuser/m")

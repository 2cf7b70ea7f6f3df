"""The QLoRA recipe: one flat job with setup / train / save / register / cleanup.

Base in 4-bit NF4 (bitsandbytes), LoRA through peft, transformers' Trainer for the loop,
every run tracked in MLflow and every finished adapter registered as a new version.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from registry.base_model import (
    BaseModel,
    resolve_base_model,
    tokenizer_digests,
)
from registry.errors import LoraplexError, UsageError
from registry.home import Home
from registry.lineage import Lineage
from registry.store import AdapterRegistry, AdapterVersion
from registry.tracking import redacted
from train.config import TrainConfig
from train.data import data_hash, load_splits, tokenize_split
from train.run_folder import (
    flatten,
    hold,
    new_run_dir,
    read_record,
    run_to_resume,
    write_record,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    status: str  # "finished" or "interrupted"
    run_dir: Path
    run_id: str
    adapter_dir: Path | None = None
    version: AdapterVersion | None = None
    metrics: dict | None = None


class TrainingJob:
    def __init__(
        self,
        config: TrainConfig,
        *,
        tracking_uri: str | None = None,
        resume: bool = False,
        home: Home | None = None,
    ):
        self.config = config
        self.home = home or Home.from_env()
        self.registry = AdapterRegistry(tracking_uri, self.home)
        self.resume = resume
        self.run_id: str | None = None  # the MLflow run, once setup has opened it
        self.run_dir: Path | None = None  # its folder, once setup has made or chosen it
        self._lock = None  # on the run folder from setup until run ends (run_folder.hold)
        self.interrupt = None  # the Trainer's Ctrl-C callback, once built

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        cfg = self.config
        self.base: BaseModel = resolve_base_model(cfg.base_model, self.home)
        self.data_hash = data_hash(cfg.data.path)
        self.tokenizer = self._tokenizer()
        self.tokenizer_digests = tokenizer_digests(self.tokenizer)
        self.run_dir, self.checkpoint = self._run_dir()
        self._lock = hold(self.run_dir)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        splits = load_splits(cfg.data)
        self.train_data = tokenize_split(
            splits.train, splits.format, self.tokenizer, cfg.data, pack_rows=cfg.data.packing
        )
        self.eval_data = tokenize_split(
            splits.validation, splits.format, self.tokenizer, cfg.data, pack_rows=False
        )
        self.max_steps = self._max_steps(len(self.train_data))
        self.model = self._model()
        self.run_id = self._mlflow_run(len(self.train_data), len(self.eval_data))
        self.trainer = self._trainer()

    def _max_steps(self, rows: int) -> int:
        """`training.max_steps`, or the optimizer steps `training.epochs` pass over `rows`."""
        t = self.config.training
        if t.epochs is None:
            return t.max_steps
        per_epoch = math.ceil(rows / (t.batch_size * t.gradient_accumulation_steps))
        # 1.1 · 50 is 55.00000000000001 in floats: 55 steps, not 56
        return max(1, math.ceil(round(t.epochs * per_epoch, 9)))

    def _run_dir(self) -> tuple[Path, str | None]:
        """A fresh run folder, or with resume the latest unfinished one and its last checkpoint."""
        from transformers.trainer_utils import get_last_checkpoint

        runs = self.home.runs / self.config.name
        if not self.resume:
            return new_run_dir(runs), None
        run_dir = run_to_resume(runs, self._record(), self.registry.tracking_uri)
        return run_dir, get_last_checkpoint(run_dir / "checkpoints")

    def _record(self, run_id: str | None = None, status: str | None = None) -> dict:
        """What `run.json` holds of this run (train/run_folder.py)."""
        return {
            "run_id": run_id,
            "status": status,
            "tracking_uri": redacted(self.registry.tracking_uri),  # no password on disk
            "data_hash": self.data_hash,
            "base_fingerprint": self.base.fingerprint,
            "tokenizer": self.tokenizer_digests,
            "config": self.config.model_dump(mode="json"),
        }

    def _tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            raise UsageError(f"base_model: {self.base.name} has no chat template in its tokenizer")
        return tokenizer

    def compute_dtype(self):
        import torch

        name = self.config.quantization.compute_dtype
        if name == "auto":
            # CPUs without native bf16 run it 2-4x slower than fp32.
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return getattr(torch, name)

    def _model(self):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

        q, lora = self.config.quantization, self.config.lora
        dtype = self.compute_dtype()
        kwargs = {"dtype": dtype, "device_map": {"": 0} if self.device == "cuda" else "cpu"}
        if q.method != "none":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.method,
                bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=dtype,
            )
        model = AutoModelForCausalLM.from_pretrained(self.base.path, **kwargs)
        if q.method != "none":
            _keep_4bit_layers_differentiable(model)
        checkpointing = self.config.training.gradient_checkpointing
        # torch's non-reentrant checkpoint: the reentrant one is deprecated (it warns that it
        # will raise), and needs the inputs to require grads for LoRA's to flow at all.
        non_reentrant = {"use_reentrant": False}
        if q.method != "none":
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=non_reentrant,
            )
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            use_rslora=lora.use_rslora,
            target_modules=lora.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        # LoRA's A starts random, drawn before the Trainer seeds anything: seed it here, or the
        # same config trains a different adapter in every process, whatever training.seed says.
        set_seed(self.config.training.seed)
        return get_peft_model(model, peft_config)

    def _mlflow_run(self, n_train: int, n_eval: int) -> str:
        from mlflow.entities import Param, RunTag

        client = self.registry.client
        record = read_record(self.run_dir)
        if record is not None:  # resuming: reopen the interrupted run
            run_id = record["run_id"]
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment_id = self.registry.experiment_id(self.config.experiment)
        run = client.create_run(
            experiment_id,
            run_name=f"{self.config.name}-{self.run_dir.name}",
            tags={"loraplex.adapter": self.config.name, "loraplex.run_dir": str(self.run_dir)},
        )
        run_id = self.run_id = run.info.run_id  # from here a failure marks it failed
        params = {
            **flatten(self.config.model_dump(mode="json")),
            "data.train_rows": n_train,
            "data.validation_rows": n_eval,
            "training.steps": self.max_steps,  # as max_steps says, or as epochs come to
        }
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[
                RunTag("base_fingerprint", self.base.fingerprint),
                RunTag("data_hash", self.data_hash),
            ],
        )
        self._write_run_file(run_id, "running")
        return run_id

    def _write_run_file(self, run_id: str, status: str) -> None:
        write_record(self.run_dir, self._record(run_id, status))

    def _trainer(self):
        import torch
        from transformers import TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from train.callbacks import ConsoleProgress, GracefulInterrupt, MlflowMetrics
        from train.collate import RowCollator
        from train.trainer import AdapterTrainer

        t = self.config.training
        args = TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
            max_steps=self.max_steps,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.eval_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optimizer,
            logging_steps=t.logging_steps,
            eval_strategy="steps",
            eval_steps=t.eval_steps,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=2,
            seed=t.seed,
            data_seed=t.seed,
            bf16=self.compute_dtype() == torch.bfloat16,
            use_cpu=self.device == "cpu",
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=False,  # else it follows TRANSFORMERS_VERBOSITY, which we quiet
        )
        self.interrupt = GracefulInterrupt()
        trainer = AdapterTrainer(
            model=self.model,
            args=args,
            train_dataset=self.train_data,
            eval_dataset=self.eval_data,
            data_collator=RowCollator(self.tokenizer),
            processing_class=self.tokenizer,
            callbacks=[
                MlflowMetrics(self.registry.client, self.run_id, resumed=self.resume),
                self.interrupt,
            ],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ConsoleProgress)
        return trainer

    # -- train -------------------------------------------------------------------------------

    def train(self) -> bool:
        """Train to `max_steps`; False when Ctrl-C stopped it (a checkpoint holds the progress)."""
        if self.checkpoint is None:
            # LoRA's B starts at zero, but measure the base itself with the adapter switched off.
            with self.model.disable_adapter():
                self.trainer.evaluate(metric_key_prefix="base")
        else:
            log.warning("resuming %s from %s", self.config.name, self.checkpoint)
        if not self._load_finished_checkpoint():
            self.trainer.train(resume_from_checkpoint=self.checkpoint)
        if self.interrupt.requested and self.trainer.state.global_step < self.max_steps:
            self.registry.client.set_terminated(self.run_id, status="KILLED")
            self._write_run_file(self.run_id, "interrupted")
            return False
        state = self.trainer.state
        last_eval = max((h["step"] for h in state.log_history if "eval_loss" in h), default=-1)
        if last_eval != state.global_step:
            self.trainer.evaluate()
        return True

    def _load_finished_checkpoint(self) -> bool:
        """Load the adapter and Trainer state of a checkpoint that holds every step (a run
        that failed after its last one: the Trainer, resumed from it, would run one more);
        False where there is none."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState

        if self.checkpoint is None:
            return False
        checkpoint = Path(self.checkpoint)
        state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        if state.global_step < self.max_steps:
            return False
        set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors"))
        self.trainer.state = state
        return True

    def metrics(self) -> dict[str, float]:
        """Latest value of each metric over the run, base evaluation included."""
        from train.callbacks import with_perplexity

        latest: dict[str, float] = {}
        for entry in self.trainer.state.log_history:
            latest.update(with_perplexity({k: v for k, v in entry.items() if k != "step"}))
        # A resumed run's history starts at its checkpoint: the base numbers live in MLflow.
        run = self.registry.client.get_run(self.run_id)
        for key in ("base_loss", "base_perplexity"):
            if key in run.data.metrics:
                latest.setdefault(key, run.data.metrics[key])
        return {k: float(v) for k, v in latest.items() if isinstance(v, (int, float))}

    # -- save / register ---------------------------------------------------------------------

    def save(self) -> Path:
        """The adapter in PEFT format with its lineage, logged to the run as `adapter/`."""
        from importlib.metadata import version

        adapter_dir = self.run_dir / "adapter"
        self.model.save_pretrained(adapter_dir)
        peft_config = self.model.peft_config["default"]
        metrics = self.metrics()
        self.lineage = Lineage(
            name=self.config.name,
            base_model=self.base.name,
            base_fingerprint=self.base.fingerprint,
            data_hash=self.data_hash,
            rank=peft_config.r,
            alpha=peft_config.lora_alpha,
            target_modules=sorted(peft_config.target_modules),
            loraplex_version=version("loraplex"),
            metrics={k: v for k, v in metrics.items() if k.startswith(("eval_", "base_"))},
            tokenizer=self.tokenizer_digests,
        )
        self.lineage.write(adapter_dir)
        self.registry.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")
        return adapter_dir

    def register(self) -> AdapterVersion:
        run = self.registry.client.get_run(self.run_id)
        version = self.registry.register(
            self.config.name, self.run_id, f"{run.info.artifact_uri}/adapter", self.lineage
        )
        self.registry.client.set_terminated(self.run_id, status="FINISHED")
        self._write_run_file(self.run_id, "finished")
        return version

    def cleanup(self) -> None:
        """Drop checkpoints of a finished run: the adapter and MLflow hold what matters."""
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)

    def _check_finite(self) -> None:
        """Refuse to register an adapter whose training diverged: NaN or infinite weights or
        validation loss would be served under a valid version number."""
        import math

        import torch

        bad = [
            name
            for name, param in self.model.named_parameters()
            if param.requires_grad and not torch.isfinite(param).all()
        ]
        loss = self.metrics().get("eval_loss", 0.0)
        if bad or not math.isfinite(loss):
            what = f"{len(bad)} adapter weights (first {bad[0]})" if bad else "the validation loss"
            raise LoraplexError(
                f"training diverged: {what} not finite (eval_loss {loss}); nothing registered. "
                "Lower training.learning_rate or lora.alpha and train again"
            )

    def run(self) -> TrainResult:
        try:
            self.setup()
            if not self.train():
                return TrainResult("interrupted", self.run_dir, self.run_id)
            self._check_finite()
            adapter_dir = self.save()
            version = self.register()
        except BaseException as error:
            self._failed(error)
            raise
        finally:
            if self.interrupt is not None:
                self.interrupt.restore()
            if self._lock is not None:
                self._lock.release()
        self.cleanup()
        return TrainResult(
            "finished", self.run_dir, self.run_id, adapter_dir, version, self.lineage.metrics
        )

    def _failed(self, error: BaseException) -> None:
        """Record a failure. From the moment the MLflow run exists until it is registered,
        it must not stay RUNNING forever (checkpoints stay: `--resume` continues from the
        last one); a new run's folder that holds none yet goes. A failure of this recording
        (MLflow may be what failed) is logged, the original error raised."""
        if self.run_id is None:
            if self.run_dir is not None and not self.resume:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing ran in it
            return
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for mark, where in (
            (lambda: self._write_run_file(self.run_id, "failed"), "in run.json"),
            (lambda: self.registry.client.set_terminated(self.run_id, status=status), "in MLflow"),
        ):
            try:  # each alone: a full disk must not leave the MLflow run RUNNING
                mark()
            except Exception:
                log.exception("the failed run %s could not be marked %s", self.run_id, where)


def _keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes (0.50) repacks a Linear4bit's weight for a fused CPU kernel, on CPUs with
    AVX512-BF16, the first time the layer runs in eval mode without grad (as the base evaluation
    before training does), and then uses that kernel in training too. It has no backward: no
    gradient flows through the base weights to the layers before (torch only warns "an
    autograd kernel was not registered"), so every adapter but the last layer's learns from a
    wrong gradient. Keep every 4-bit layer on bitsandbytes' differentiable path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False

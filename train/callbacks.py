"""Trainer callbacks: metrics to MLflow, a readable progress line, and a Ctrl-C that saves."""

from __future__ import annotations

import math
import signal
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


def with_perplexity(logs: dict) -> dict:
    """Add `<prefix>_perplexity` = exp(`<prefix>_loss`) for each evaluation loss in `logs`."""
    out = dict(logs)
    for key, value in logs.items():
        if key.endswith("_loss") and key != "train_loss":
            out[key.removesuffix("_loss") + "_perplexity"] = math.exp(min(value, 50.0))
    return out


class MlflowMetrics(TrainerCallback):
    """Logs every Trainer log (loss curve, evaluations) as MLflow metrics of one run.

    A resumed run replays the steps after its checkpoint that a failed attempt logged
    already: each metric skips the steps its history holds."""

    def __init__(self, client, run_id: str, resumed: bool = False):
        self.client = client
        self.run_id = run_id
        self.resumed = resumed
        self._logged_through: dict[str, int] = {}  # metric -> last step logged, once resumed

    def on_log(self, args, state, control, logs=None, **kwargs):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, state.global_step)
            for key, value in with_perplexity(logs or {}).items()
            if isinstance(value, (int, float))
            and math.isfinite(value)
            and not self._logged_before(key, state.global_step)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _logged_before(self, key: str, step: int) -> bool:
        if not self.resumed:
            return False
        if key not in self._logged_through:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_through[key] = max((m.step for m in history), default=-1)
        return step <= self._logged_through[key]


class ConsoleProgress(ProgressCallback):
    """The Trainer's progress bar, with one short line per log instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        logs = with_perplexity(logs)
        if "loss" in logs:
            line = f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}"
            if "learning_rate" in logs:
                line += f"  lr {logs['learning_rate']:.2e}"
        elif "eval_loss" in logs:
            line = (
                f"step {state.global_step}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}"
                f"  perplexity {logs['eval_perplexity']:.2f}"
            )
        else:
            return
        self.training_bar.write(line)


class GracefulInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) ends training after the current step with a resumable checkpoint.

    A second Ctrl-C interrupts at once, as usual.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGINT, self._request)

    def restore(self) -> None:
        """Ctrl-C as it was before training (also where training raised: no on_train_end)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

"""Training throughput of a demo config: QLoRA (NF4 base) against LoRA over the fp32 base,
and QLoRA with `data.packing` (whole examples sharing rows) against without.

    .venv/bin/python bench/train_throughput.py [CONFIG] [--steps N]   (default 12)

Each variant runs in its own child process (so peak memory is its own), with the same config,
data and seed; the parent prints steps/s, tokens/s and peak RSS of each and their ratios.
Numbers come from the median step time after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs/train/construction-faq_smollm2-135m_qlora_cpu.yaml"
VARIANTS = {
    "qlora-nf4": ("quantization.method=nf4",),
    "lora-fp32": ("quantization.method=none",),
    "qlora-packed": ("quantization.method=nf4", "data.packing=true"),
}


def measure(config_path: str, overrides: tuple[str, ...], steps: int) -> dict:
    """Train `steps` steps in this process; step times and tokens seen."""
    sys.path.insert(0, str(ROOT))
    from transformers import TrainerCallback

    from registry.home import setup_environment
    from train.config import load_config
    from train.recipe import TrainingJob

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.stamps.append([time.perf_counter(), state.num_input_tokens_seen])

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps[-1] += [time.perf_counter(), state.num_input_tokens_seen]

    home = setup_environment()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            Path(config_path),
            [
                *overrides,
                f"name=bench-{os.getpid()}",
                f"training.max_steps={steps}",
                "training.epochs=null",  # the GPU config trains by epochs
                f"training.eval_steps={steps + 1}",
                f"training.save_steps={steps + 1}",
                f"training.logging_steps={steps + 1}",
                "training.warmup_steps=0",
            ],
        )
        job = TrainingJob(config, tracking_uri=f"sqlite:///{tmp}/mlflow.db", home=home)
        job.setup()
        clock = StepClock()
        job.trainer.add_callback(clock)
        job.trainer.train()
        job.cleanup()
    import shutil

    shutil.rmtree(job.run_dir, ignore_errors=True)
    # Tokens per step come from the counter Trainer keeps of non-padding input tokens.
    steps_timed = clock.stamps[1:]
    seconds = [end - start for start, _, end, _ in steps_timed]
    tokens = [after - before for _, before, _, after in steps_timed]
    return {
        "step_s": statistics.median(seconds),
        "tokens_per_step": statistics.mean(tokens),
        "batch_size": config.training.batch_size,
    }


def run_child(config: str, variant: str, steps: int) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            config,
            "--steps",
            str(steps),
            "--child",
            variant,
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{variant} failed (status {status})")
    result = json.loads(out.read_text())
    out.unlink()
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(
            json.dumps(measure(args.config, VARIANTS[args.child], args.steps))
        )
        return

    results = {name: run_child(args.config, name, args.steps) for name in VARIANTS}
    print(f"config: {Path(args.config).name}, {args.steps} steps, median after 1 warm-up step")
    print(f"{'variant':<12} {'steps/s':>8} {'tokens/s':>9} {'peak RSS GiB':>13}")
    for name, r in results.items():
        print(
            f"{name:<12} {1 / r['step_s']:>8.3f} {tokens_per_s(r):>9.0f} {r['peak_rss_gib']:>13.2f}"
        )
    q, f, p = results["qlora-nf4"], results["lora-fp32"], results["qlora-packed"]
    print(
        f"ratio qlora/lora: speed {f['step_s'] / q['step_s']:.2f}x, "
        f"peak memory {q['peak_rss_gib'] / f['peak_rss_gib']:.2f}x"
    )
    print(
        f"ratio packed/unpacked: tokens/s {tokens_per_s(p) / tokens_per_s(q):.2f}x, "
        f"tokens a step {p['tokens_per_step'] / q['tokens_per_step']:.2f}x, "
        f"peak memory {p['peak_rss_gib'] / q['peak_rss_gib']:.2f}x"
    )


def tokens_per_s(result: dict) -> float:
    """Input tokens but padding, a second."""
    return result["tokens_per_step"] / result["step_s"]


if __name__ == "__main__":
    main()

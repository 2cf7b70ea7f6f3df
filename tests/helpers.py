"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_adapter(
    base,
    dest: Path,
    *,
    name: str = "demo",
    rank: int = 4,
    seed: int = 0,
    targets=("q_proj", "v_proj"),
) -> Path:
    """A real PEFT LoRA folder over `base` (random, nonzero B) with its loraplex lineage."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from registry.lineage import Lineage

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(dest)
    Lineage(
        name=name,
        base_model=base.name,
        base_fingerprint=base.fingerprint,
        data_hash="sha256:test",
        rank=rank,
        alpha=2 * rank,
        target_modules=sorted(targets),
        loraplex_version="0.1.0",
    ).write(dest)
    return dest


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`loraplex ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [str(BIN / "loraplex"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=PROJECT,
    )

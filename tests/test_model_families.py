"""The runner on tiny random models of each supported family against transformers' greedy
tokens: GQA, untied embeddings, Llama-3 RoPE scaling, Qwen2 attention biases, Mistral."""

from __future__ import annotations

import shutil

import pytest
import torch

from serve import LLM, SamplingParams
from tests.helpers import TINY_SHAPE


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


@pytest.mark.parametrize(
    "make_config", [_llama3, _qwen2, _mistral], ids=["llama3-rope", "qwen2", "mistral"]
)
def test_family_matches_transformers_greedy(make_config, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config())
    with torch.no_grad():  # random biases too, so they matter (Qwen2 creates them as zeros)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5)
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.path / name, tmp_path / name)
    prompts = [
        [1, 400, 401, 402, 403],
        [
            1,
            9,
            8,
            7,
            6,
            5,
            4,
            3,
            20,
            21,
            22,
            23,
            24,
            25,
            26,
            27,
            28,
            29,
            30,
            31,
            32,
            33,
            34,
            35,
            36,
            37,
            38,
            39,
            40,
            41,
            42,
            43,
            44,
            45,
            46,
            47,
            48,
            49,
            50,
            51,
            52,
            53,
            54,
            55,
            56,
            57,
            58,
            59,
            60,
            61,
            62,
            63,
            64,
            65,
            66,
            67,
            68,
            69,
            70,
            71,
            72,
            73,
            74,
            75,
        ],
    ]
    expected = []
    for p in prompts:  # positions beyond 64 exercise the llama3 low/high frequency bands
        ids = torch.tensor([p])
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        expected.append(out[0, ids.shape[1] :].tolist())
    llm = LLM(base_model=str(tmp_path), quantization=None, num_kv_blocks=64, block_size=8)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected

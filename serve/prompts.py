"""How a prompt becomes token ids: one rule for the engine, the server, the gate and the
benchmarks, so what the gate measures is what the server serves."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages through the base model's chat template, ready for the answer. The template
    writes the special tokens it wants, so the tokenizer adds none."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """A plain-text prompt, with the tokenizer's special tokens (a BOS where the model has one)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]

"""What the gate measures through the serving engine: answers and answer-token log-likelihoods.

What is gated is what is served: the same `LLM` (base, quantization, adapter slots) as
`loraplex serve`, never a separate transformers code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve import LLM, SamplingParams
from train.data import IGNORE_INDEX, encode


@dataclass(frozen=True)
class Likelihood:
    """Of one example: the summed negative log-likelihood of its answer tokens, and their count."""

    nll: float
    tokens: int


def answer_likelihoods(
    llm: LLM, records, fmt: str, max_length: int, adapters: list[str | None]
) -> dict[str | None, list[Likelihood]]:
    """Per adapter (None: the base), the Likelihood of each record's answer tokens.

    The whole example is sent as a prompt and scored through the engine's prompt logprobs;
    like the training loss, only tokens labelled as answer count.
    """
    examples = [encode(r, fmt, llm.tokenizer, max_length) for r in records]
    examples = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"][1:])]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    prompts = [e["input_ids"] for e in examples] * len(adapters)
    names = [a for a in adapters for _ in examples]
    outputs = llm.generate(prompts, params, adapters=names, use_tqdm=True)
    result: dict[str | None, list[Likelihood]] = {a: [] for a in adapters}
    for name, example, output in zip(names, examples * len(adapters), outputs, strict=True):
        scored = [
            -lp.logprob
            for label, lp in zip(example["labels"], output.prompt_logprobs, strict=True)
            if label != IGNORE_INDEX and lp is not None
        ]
        result[name].append(Likelihood(sum(scored), len(scored)))
    return result


def answers(
    llm: LLM, conversations: list[list[dict]], max_tokens: int, adapters: list[str | None]
) -> dict[str | None, list[str]]:
    """Per adapter, its greedy answer to each conversation (what the server would return)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    names = [a for a in adapters for _ in conversations]
    outputs = llm.chat(conversations * len(adapters), params, adapters=names, use_tqdm=True)
    result: dict[str | None, list[str]] = {a: [] for a in adapters}
    for name, output in zip(names, outputs, strict=True):
        result[name].append(output.text.strip())
    return result

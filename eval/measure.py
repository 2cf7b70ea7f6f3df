"""What the gate measures: answers and answer-token log-likelihoods, from the models as served.

Two ways to reach them, with the same two questions: `EngineModels` runs the serving engine in
this process (the same `LLM`, base quantization and adapter slots as `loraplex serve`, never a
separate transformers code path); `eval.served.ServedModels` asks a running server. Models are
named by their role in the gate (candidate, baseline; None is the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from serve import LLM, SamplingParams
from train.data import IGNORE_INDEX, encode, has_target


class Models(Protocol):
    tokenizer: object

    def prompt_logprobs(
        self, prompts: list[list[int]], models: list[str | None]
    ) -> list[list[float | None]]:
        """Per prompt, the logprob of each of its tokens given those before (first: None)."""

    def answers(
        self, conversations: list[list[dict]], max_tokens: int, models: list[str | None]
    ) -> list[str]:
        """Per conversation, the model's greedy answer (what the server returns)."""


class EngineModels:
    """The models in this process: adapters loaded into `llm` under their role's name."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.tokenizer = llm.tokenizer

    def prompt_logprobs(self, prompts, models):
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        outputs = self.llm.generate(prompts, params, adapters=models, use_tqdm=True)
        return [
            [None if lp is None else lp.logprob for lp in out.prompt_logprobs] for out in outputs
        ]

    def answers(self, conversations, max_tokens, models):
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        outputs = self.llm.chat(conversations, params, adapters=models, use_tqdm=True)
        return [out.text for out in outputs]


@dataclass(frozen=True)
class Likelihood:
    """Of one example: the summed negative log-likelihood of its answer tokens, and their count."""

    nll: float
    tokens: int


def answer_likelihoods(
    models: Models, records, fmt: str, max_length: int, names: list[str | None]
) -> dict[str | None, list[Likelihood]]:
    """Per model, the Likelihood of each record's answer tokens.

    The whole example is sent as a prompt and scored through its prompt logprobs; like the
    training loss, only tokens labelled as answer count.
    """
    examples = [encode(r, fmt, models.tokenizer, max_length) for r in records]
    examples = [e for e in examples if has_target(e["labels"])]  # as training keeps them
    prompts = [e["input_ids"] for e in examples] * len(names)
    per_prompt = [n for n in names for _ in examples]
    scored = models.prompt_logprobs(prompts, per_prompt)
    result: dict[str | None, list[Likelihood]] = {n: [] for n in names}
    for name, example, logprobs in zip(per_prompt, examples * len(names), scored, strict=True):
        # The first token has no logprob (nothing precedes it; training cannot predict it
        # either). Past it, a labelled token without one (a server's null for a NaN) is a
        # broken sample: NaN fails the candidate, where leaving it out would average it away.
        nll = [
            math.nan if lp is None else -lp
            for label, lp in zip(example["labels"][1:], logprobs[1:], strict=True)
            if label != IGNORE_INDEX
        ]
        result[name].append(Likelihood(sum(nll), len(nll)))
    return result


def answers(
    models: Models, conversations: list[list[dict]], max_tokens: int, names: list[str | None]
) -> dict[str | None, list[str]]:
    """Per model, its greedy answer to each conversation."""
    per_conversation = [n for n in names for _ in conversations]
    texts = models.answers(conversations * len(names), max_tokens, per_conversation)
    result: dict[str | None, list[str]] = {n: [] for n in names}
    for name, text in zip(per_conversation, texts, strict=True):
        result[name].append(text.strip())
    return result

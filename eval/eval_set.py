"""The eval set: held-out questions with reference answers and retrieved contexts.

Built from the adapter's test split (the same `load_splits` the trainer used, so no example
it trained on can appear). The knowledge base a question retrieves from is every passage of
the data file: each record's `context_field`, or its answer when the data has no passages.
A record with no question and answer to ask (training skips it too) or with no passage text
is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from registry.errors import ConfigError
from train.data import SplitData, to_messages


@dataclass(frozen=True)
class EvalSample:
    messages: list[dict]  # the conversation up to the answer (what the model is asked)
    question: str  # the last user message
    reference: str  # the reference answer
    reference_contexts: list[str]  # the passage the answer comes from
    retrieved_contexts: list[str]  # the top-k passages the retriever finds for the question


def select_test_records(splits: SplitData, max_samples: int):
    """The first `max_samples` records of the test split, in file order (`split_indices` sorts
    each part): which records are in the test split is random, their order is the file's."""
    return splits.test.select(range(min(max_samples, len(splits.test))))


def build_eval_set(splits: SplitData, records, context_field: str | None, top_k: int, embed):
    """EvalSamples of `records` (from the test split); `embed(texts) -> [n, d]` unit vectors."""
    if splits.format == "text":
        raise ConfigError("the RAGAS metrics need question/answer data (alpaca or chat), not text")
    every = [*splits.train, *splits.validation, *splits.test]
    if context_field is not None and context_field not in splits.test.column_names:
        raise ConfigError(
            f"eval_set.context_field: no column {context_field!r} in the data "
            f"(columns: {sorted(splits.test.column_names)})"
        )
    fmt = splits.format
    passages = [_passage(r, fmt, context_field) for r in every]
    passages = list(dict.fromkeys(p for p in passages if p is not None))
    samples = []  # (exchange, passage) of each record that has both
    for record in records:
        exchange, passage = _exchange(record, fmt), _passage(record, fmt, context_field)
        if exchange is not None and passage is not None:
            samples.append((exchange, passage))
    if not samples:
        raise ConfigError(
            f"eval_set: none of the {len(records)} test records has a user question followed "
            "by an answer" + (f" and a text {context_field!r}" if context_field else "")
        )
    questions = [question for (_, question, _), _ in samples]
    retrieved = _retrieve(embed(questions), embed(passages), top_k)
    return [
        EvalSample(
            messages=messages,
            question=question,
            reference=reference,
            reference_contexts=[passage],
            retrieved_contexts=[passages[i] for i in hits],
        )
        for ((messages, question, reference), passage), hits in zip(samples, retrieved, strict=True)
    ]


def _exchange(record: dict, fmt: str) -> tuple[list[dict], str, str] | None:
    """The conversation up to its last answer, the question before that answer, the answer;
    None where no user question is followed by an answer."""
    messages = to_messages(record, fmt)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompt = messages[: answers[-1]] if answers else []
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
    if question is None:
        return None
    return prompt, question, messages[answers[-1]]["content"]


def _passage(record: dict, fmt: str, context_field: str | None) -> str | None:
    """The record's passage for retrieval; None where it has no text."""
    if context_field is not None:
        text = record[context_field]
    else:
        exchange = _exchange(record, fmt)
        text = exchange[2] if exchange else None
    return text if isinstance(text, str) and text.strip() else None


def _retrieve(queries: np.ndarray, passages: np.ndarray, top_k: int) -> list[list[int]]:
    """Indices of the top_k passages by cosine similarity, best first. Inputs are unit rows."""
    scores = queries @ passages.T  # [questions, passages]
    return np.argsort(-scores, axis=1, kind="stable")[:, :top_k].tolist()

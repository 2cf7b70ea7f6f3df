"""Offline batch generation: `LLM(...).generate(prompts, params, adapters=[...])`."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

from serve.adapter_catalog import AdapterInfo
from serve.config import EngineConfig
from serve.engine import LLMEngine
from serve.outputs import RequestOutput
from serve.prompts import chat_prompt_ids
from serve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLM:
    """Many prompts, each with its own adapter (or None for the base), in shared batches."""

    def __init__(
        self, base_model: str | None = None, quantization: str | None = "nf4", **engine_args
    ):
        if base_model is not None:
            engine_args["base_model"] = base_model
        self.engine = LLMEngine(EngineConfig(quantization=quantization, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        return self.engine.load_adapter(name, source)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Final outputs in prompt order. Prompts are text (tokenized as is) or token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), n, "sampling_params")
        adapters = _per_prompt(adapters, n, "adapters") if adapters is not None else [None] * n
        ids = []
        try:
            for prompt, p, adapter in zip(prompts, params, adapters, strict=True):
                ids.append(self.engine.add_request(prompt, p, adapter))
        except Exception:
            self._abort_all(ids)  # all or nothing: leave no orphans in the engine
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        conversations: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Like generate, for chat messages rendered with the base model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.render_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, adapters, use_tqdm)

    def render_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            wanted = set(ids)  # the engine may hold requests of other callers
            while len(final) < len(ids):
                for output in self.engine.step():
                    if output.error is not None and output.request_id in wanted:
                        raise output.error
                    if output.finished and output.request_id in wanted:
                        final[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:  # a failed step (or Ctrl-C): leave no request behind to fail the next
            self._abort_all(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in ids]

    def _abort_all(self, ids: list[str]) -> None:
        """Abort each request (every one: an abort that fails still releases its request)."""
        for request_id in ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # its last output failed (a bug): the error being raised matters
                log.exception("request %s: its abort failed", request_id)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, SamplingParams) or value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return value

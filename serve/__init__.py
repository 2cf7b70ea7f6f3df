"""The serving engine: paged KV cache, continuous batching, many LoRA adapters in one batch.

    from serve import LLM, SamplingParams

Names load on first use, so the CLI can import `serve.cli` without importing torch.
"""

import importlib

_EXPORTS = {
    "LLM": "serve.llm",
    "AsyncLLM": "serve.async_engine",
    "EngineConfig": "serve.config",
    "EngineStepError": "serve.async_engine",
    "EngineStopped": "serve.async_engine",
    "LLMEngine": "serve.engine",
    "RequestFailed": "serve.async_engine",
    "RequestOutput": "serve.outputs",
    "SamplingParams": "serve.sampling_params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")

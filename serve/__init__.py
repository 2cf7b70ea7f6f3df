"""The serving engine: paged KV cache, continuous batching, many LoRA adapters in one batch.

from serve import LLM, SamplingParams
"""

from serve.config import EngineConfig
from serve.engine import LLMEngine
from serve.llm import LLM
from serve.outputs import RequestOutput
from serve.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

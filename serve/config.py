"""Engine settings, validated on construction with the field and its range named."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from registry.base_model import DEFAULT_BASE_MODEL
from registry.config_file import Number, StrictConfig


class EngineConfig(StrictConfig):
    base_model: str = DEFAULT_BASE_MODEL  # embedded name or a Hugging Face folder
    # as the adapters were trained; "none" is None, as a train config and the CLI spell it
    quantization: Literal["nf4", "fp4"] | None = "nf4"
    double_quant: StrictBool = True
    # Packed 4-bit weights (memory /4) or the same weights dequantized once at load (no
    # per-step dequantization). None: packed on GPU, dequantized on CPU.
    keep_quantized: StrictBool | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_size: StrictInt = Field(16, ge=1, le=256)  # tokens per KV block: waste vs table size
    # KV pool size in GiB (2**30 bytes); the block count and the longest context follow.
    # None: on CUDA, what gpu_memory_utilization leaves after the weights and the largest
    # step; 1 GiB on CPU
    kv_cache_memory_gb: Number | None = Field(None, gt=0)
    # share of the GPU's memory this engine may fill (KV sizing only): the rest is headroom
    # for CUDA graphs and fragmentation, or room for another process
    gpu_memory_utilization: Number = Field(0.9, gt=0, le=1)
    num_kv_blocks: StrictInt | None = Field(None, ge=1)  # overrides kv_cache_memory_gb (tests)
    max_num_seqs: StrictInt = Field(32, ge=1)  # running sequences per step
    max_num_batched_tokens: StrictInt = Field(512, ge=1)  # tokens a step (the prefill chunk)
    max_model_len: StrictInt | None = Field(None, ge=2)  # default: the model's context length
    max_loras: StrictInt = Field(8, ge=1)  # device slots: distinct adapters in one step
    max_lora_rank: StrictInt = Field(16, ge=1, le=512)  # slots are padded to this rank
    max_cpu_loras: StrictInt = Field(32, ge=1)  # adapters kept in host memory
    enable_prefix_caching: StrictBool = True
    seed: StrictInt = 0  # of the sampler for requests without their own seed
    # Triton kernels for attention, LoRA and 4-bit matmuls: "auto" on CUDA when triton
    # imports; "reference" forces the plain ops (to compare, or to rule the kernels out)
    kernels: Literal["auto", "triton", "reference"] = "auto"
    # Decode steps replayed as CUDA graphs (serve.cuda_graph); needs the kernels. Off until
    # measured on a GPU (bench/gpu_notes.md)
    cuda_graphs: StrictBool = False
    # Make a step's outputs (text, stop strings) while the device computes the next step:
    # the host's work hides behind the GPU's, each output comes a step later. None: on CUDA
    overlap_outputs: StrictBool | None = None
    # Compile every Triton kernel variant at start over scratch steps (serve.warmup): seconds
    # on a fresh machine, Triton's disk cache after, rather than stalls in the first requests'
    # steps. Nothing to do without the kernels
    warmup: StrictBool = True
    tracking_uri: str | None = None  # registry for adapter references (default: embedded)

    @field_validator("quantization", mode="before")
    @classmethod
    def _none_is_none(cls, value):
        return None if value == "none" else value

    @field_validator("max_cpu_loras")
    @classmethod
    def _holds_every_slot(cls, value: int, info: ValidationInfo) -> int:
        # A step fills slots from the host tier: with fewer host copies than slots, one step's
        # reads would evict each other and every adapter would be read from disk twice.
        slots = info.data.get("max_loras")
        if slots is not None and value < slots:
            raise ValueError(f"must be at least max_loras ({slots}): slots load from host memory")
        return value

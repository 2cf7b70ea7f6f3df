"""The serving engine: paged KV cache, continuous batching, many LoRA adapters in one batch."""

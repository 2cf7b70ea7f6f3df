"""Base linear layers: dense, or NF4/FP4 through bitsandbytes exactly as the trainer loads them.

On CPU, bitsandbytes dequantizes a 4-bit weight on every call and then runs a dense matmul;
`quantize_then_dequantize` does that once at load instead: the same weights to the last bit,
4x the memory of packed storage, no per-step dequantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN's fp32 linear (the op torch.compile emits on CPU). torch sends fp32 F.linear to MKL,
# whose sgemm runs 1.1-1.7x slower than oneDNN's at the 8-256 rows of a serving step on this
# AMD CPU (bench/cpu_notes.md); the tokens stay those of transformers (the parity tests).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """y = x @ weightᵀ + bias, through oneDNN for fp32 on the CPU, else F.linear."""
    if (
        _ONEDNN_LINEAR is not None
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
    ):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight  # [out, in]
        self.bias = bias  # [out] or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Linear4bit:
    """A weight quantized by `bitsandbytes.functional.quantize_4bit` with the settings of
    `BitsAndBytesConfig(load_in_4bit=True, ...)` (block size 64), so the served base is the one
    the adapter was trained against."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quant_type: str,
        double_quant: bool,
        compute_dtype: torch.dtype,
    ):
        import bitsandbytes.functional as bnbf

        self.packed, self.state = bnbf.quantize_4bit(
            weight.contiguous(),
            blocksize=64,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=torch.uint8,
        )
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = x.dtype
        out = bnb.matmul_4bit(
            x.to(self.compute_dtype), self.packed, quant_state=self.state, bias=self.bias
        )
        return out.to(dtype)


def quantize_then_dequantize(
    weight: torch.Tensor, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> torch.Tensor:
    """The weight the 4-bit base computes with: W -> quantize_4bit -> dequantize_4bit."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=64,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    return bnbf.dequantize_4bit(packed, state).to(compute_dtype)

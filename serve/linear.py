"""Base linear layers: dense, or NF4/FP4 through bitsandbytes exactly as the trainer loads them.

On CPU, bitsandbytes dequantizes a 4-bit weight on every call and then runs a dense matmul;
`quantize_then_dequantize` does that once at load instead: the same weights to the last bit,
4x the memory of packed storage, no per-step dequantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCKSIZE = 64  # weights per absmax, as the trainer's BitsAndBytesConfig quantizes

# oneDNN's linear (the op torch.compile emits on CPU). torch sends fp32 F.linear to MKL, whose
# sgemm runs 1.1-1.7x slower than oneDNN's at the 8-256 rows of a serving step on this AMD CPU,
# and bf16 to a plain mm that oneDNN beats too, on CPUs with bf16 instructions
# (bench/cpu_notes.md); the tokens stay those of transformers (the parity tests).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available():
        return ()
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_ONEDNN_DTYPES = _onednn_dtypes()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """y = x @ weightᵀ + bias, through oneDNN for fp32 (and bf16 where the CPU has bf16
    instructions) on the CPU, else F.linear."""
    if x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
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
        self.packed, self.state = quantize_4bit(weight, quant_type, double_quant)
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = x.dtype
        out = bnb.matmul_4bit(
            x.to(self.compute_dtype), self.packed, quant_state=self.state, bias=self.bias
        )
        return out.to(dtype)


# Rows past which PackedLinear4bit writes the dense weight out once and multiplies densely:
# a compute-bound prefill chunk, where rebuilding W per row tile costs more (a prediction,
# bench/gpu_throughput.py's matmul section measures both sides).
DEQUANTIZE_ABOVE_ROWS = 256


class PackedLinear4bit:
    """Modules that read the same input (q/k/v, gate/up) as one 4-bit weight, multiplied by
    the Triton kernel `serve.kernels.nf4_matmul` in one launch (dequantized first for
    prefill-sized inputs). Each module is quantized on its own, exactly as `Linear4bit` (and
    the trainer) quantizes it; their packed bytes and fp32 scales are then laid end to end,
    which is the stacked weight's layout when every module holds a whole number of 64-weight
    blocks (`stackable`)."""

    def __init__(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        quant_type: str,
        double_quant: bool,
        compute_dtype: torch.dtype,
    ):
        from serve.kernels.nf4_matmul import nf4_dequantize, nf4_matmul

        shapes = [tuple(w.shape) for w in weights]
        if not stackable(shapes):
            raise ValueError(f"4-bit weights {shapes} cannot be stacked: see `stackable`")
        packs, scales = [], []
        for weight in weights:
            packed, state = quantize_4bit(weight, quant_type, double_quant)
            packs.append(packed.flatten())
            scales.append(_absmax(state))
        self.packed, self.absmax = torch.cat(packs), torch.cat(scales)
        self.code = state.code.to(device=self.packed.device, dtype=torch.float32)
        self.out_features = sum(w.shape[0] for w in weights)
        self.bias = stacked_bias(weights, biases)
        if self.bias is not None:
            self.bias = self.bias.to(compute_dtype)
        self._matmul, self._dequantize = nf4_matmul, nf4_dequantize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        operands = (self.packed, self.absmax, self.code, self.out_features)
        if x.shape[0] > DEQUANTIZE_ABOVE_ROWS:
            return F.linear(x, self._dequantize(*operands, x.dtype), self.bias)
        return self._matmul(x, *operands, self.bias)


def stackable(shapes: list[tuple[int, int]]) -> bool:
    """Whether `PackedLinear4bit` can hold weights of these (out, in) shapes: a shared, even
    `in` (bytes hold two weights of one row) and 64-weight blocks that end where each module
    ends."""
    in_features = shapes[0][1]
    return (
        in_features % 2 == 0
        and all(n == in_features for _, n in shapes)
        and all(out * n % BLOCKSIZE == 0 for out, n in shapes[:-1])
    )


def quantize_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool):
    """bitsandbytes' packed 4-bit weight and QuantState, with the trainer's settings."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )


def quantize_then_dequantize(
    weight: torch.Tensor, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> torch.Tensor:
    """The weight the 4-bit base computes with: W -> quantize_4bit -> dequantize_4bit."""
    import bitsandbytes.functional as bnbf

    packed, state = quantize_4bit(weight, quant_type, double_quant)
    return bnbf.dequantize_4bit(packed, state).to(compute_dtype)


def _absmax(state) -> torch.Tensor:
    """A QuantState's fp32 scale per 64 weights, double quantization undone as
    `dequantize_4bit` undoes it."""
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def stacked_bias(weights, biases) -> torch.Tensor | None:
    """The modules' biases end to end (zeros for a module without one), or None."""
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            b if b is not None else w.new_zeros(w.shape[0])
            for w, b in zip(weights, biases, strict=True)
        ]
    )

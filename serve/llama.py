"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) as plain tensors and one
forward.

Reads Hugging Face safetensors from a folder. Every sequence of a step is one row block of a
flat token batch: the linear layers and LoRA run once over all tokens; attention reads each
sequence's K/V through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from registry.base_model import LORA_MODULES, weight_files
from registry.errors import UsageError
from serve.attention import paged_attention
from serve.linear import (
    DenseLinear,
    Linear4bit,
    PackedLinear4bit,
    linear,
    quantize_then_dequantize,
    stackable,
    stacked_bias,
)

SUPPORTED_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
PARENT_OF = {m: "self_attn" for m in LORA_MODULES[:4]} | {m: "mlp" for m in LORA_MODULES[4:]}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    # The longest context served exactly, and the config's field that sets it
    max_context: int
    context_limit: str = "max_position_embeddings"
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        if config.model_type not in SUPPORTED_TYPES:
            raise UsageError(
                f"base_model: model_type {config.model_type!r} is not served; "
                f"supported: {', '.join(sorted(SUPPORTED_TYPES))}"
            )
        activation = getattr(config, "hidden_act", "silu")
        if activation not in ("silu", "swish"):  # the MLP is SwiGLU
            raise UsageError(f"base_model: hidden_act {activation!r} is not served; only silu")
        heads = config.num_attention_heads
        longest, limit = _longest_context(config)
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_context=longest,
            context_limit=limit,
            qk_norm=config.model_type == "qwen3",
        )

    def lora_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]


def _longest_context(config) -> tuple[int, str]:
    """The longest context one attention and one RoPE table serve as transformers does, and
    the config field that sets it."""
    longest, limit = config.max_position_embeddings, "max_position_embeddings"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        # Past its original length longrope moves every position to its long factors (once a
        # sequence is longer, transformers recomputes them): one table holds the short ones.
        field = "original_max_position_embeddings"
        original = rope.get(field) or getattr(config, field, None) or longest
        if original < longest:
            longest, limit = original, f"rope_parameters.{field}"
    window = getattr(config, "sliding_window", None)
    if config.model_type.startswith("qwen"):
        layer_types = getattr(config, "layer_types", None) or []
        if not getattr(config, "use_sliding_window", 0) or (
            layer_types and "sliding_attention" not in layer_types
        ):
            window = None  # Qwen configs name a window no layer uses (max_window_layers)
    if window is not None and window < longest:
        # Within its window a sliding-window model attends to every earlier token: sequences
        # stop there, and the plain causal attention is exact.
        longest, limit = window, "sliding_window"
    return longest, limit


def rope_tables(config, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position, as transformers computes them: [max_len, head_dim]."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "dynamic":
        raise UsageError("base_model: dynamic NTK RoPE scaling is not supported")
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    positions = torch.arange(max_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps) over the last dimension, as transformers computes it."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # one fused op instead of six; bitwise the same in fp32 (half precision rounds between
        # the steps in transformers, so it keeps the explicit form)
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


# The layer's modules by the input they read, in the order the forward pass runs them: one
# matmul per group when the weights are dense, one LoRA shrink per group in the adapter pool.
QKV, OUT, GATE_UP, DOWN = FUSED_GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


class Layer:
    def __init__(self, norms, linears, shape: ModelShape, qk_norms=None):
        self.input_norm, self.post_norm = norms  # [hidden] each
        self.qk_norms = qk_norms  # (query, key) norms, [head_dim] each; None: no such norms
        # module names -> DenseLinear | Linear4bit | PackedLinear4bit over their stacked weights
        self.linears = linears
        self.group_of = {m: g for g in linears for m in g}
        # output width of each module of a group, to split the stacked output
        self.widths = {g: [shape.lora_dims(m)[1] for m in g] for g in linears}


class LlamaModel:
    """Weights and forward pass. `quantization` is None, "nf4" or "fp4"; with
    `keep_quantized` False the 4-bit weights are dequantized once at load (see serve.linear).
    `use_triton`: attention and 4-bit matmuls through the Triton kernels (CUDA only, see
    serve.kernels)."""

    def __init__(
        self,
        path: Path,
        *,
        dtype=torch.float32,
        device="cpu",
        quantization: str | None = "nf4",
        double_quant: bool = True,
        keep_quantized: bool = True,
        max_model_len: int | None = None,
        use_triton: bool = False,
    ):
        from safetensors import safe_open
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(path)
        self.shape = ModelShape.from_config(self.config)
        self.dtype, self.device = dtype, torch.device(device)
        longest = self.shape.max_context
        self.max_model_len = min(max_model_len or longest, longest)
        tensors = {}
        files = [f for f in weight_files(Path(path)) if f.suffix == ".safetensors"]
        if not files:
            raise UsageError(f"base_model: no *.safetensors weights in {path}")
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name.removeprefix("model.")] = f.get_tensor(name)

        def take(name):
            return tensors.pop(name).to(device=self.device, dtype=dtype)

        packed = quantization is not None and keep_quantized
        self.keeps_4bit = packed  # else dense weights (4-bit ones dequantized once, here)
        # On CUDA with the kernels, 4-bit modules that read the same input are one stacked
        # weight and one launch (serve.kernels.nf4_matmul); bitsandbytes takes them one by one.
        packed_kernel = (
            packed
            and use_triton
            and all(
                stackable([self.shape.lora_dims(m)[::-1] for m in group]) for group in FUSED_GROUPS
            )
        )

        def linear_group(prefix: str, modules: tuple[str, ...]):
            """One linear over the modules' stacked weights: one larger matmul instead of
            several small ones."""
            weights, biases = [], []
            for m in modules:
                name = f"{prefix}.{PARENT_OF[m]}.{m}"
                weight = take(f"{name}.weight")
                if quantization is not None and not keep_quantized:
                    weight = quantize_then_dequantize(weight, quantization, double_quant, dtype)
                weights.append(weight)
                biases.append(take(f"{name}.bias") if f"{name}.bias" in tensors else None)
            if packed_kernel:
                return PackedLinear4bit(weights, biases, quantization, double_quant, dtype)
            if packed:
                [weight], [bias] = weights, biases
                return Linear4bit(weight, bias, quantization, double_quant, dtype)
            return DenseLinear(torch.cat(weights), stacked_bias(weights, biases))

        groups = [(m,) for m in LORA_MODULES] if packed and not packed_kernel else FUSED_GROUPS

        s = self.shape
        self.embed = take("embed_tokens.weight")  # [vocab, hidden]
        self.layers = []
        for i in range(s.num_layers):
            p = f"layers.{i}"
            norms = (
                take(f"{p}.input_layernorm.weight"),
                take(f"{p}.post_attention_layernorm.weight"),
            )
            linears = {g: linear_group(p, g) for g in groups}
            qk_norms = None
            if s.qk_norm:
                qk_norms = (
                    take(f"{p}.self_attn.q_norm.weight"),
                    take(f"{p}.self_attn.k_norm.weight"),
                )
            self.layers.append(Layer(norms, linears, s, qk_norms))
        self.norm = take("norm.weight")
        lm_head = tensors.pop("lm_head.weight", None)
        self.lm_head = (
            self.embed
            if s.tie_word_embeddings or lm_head is None
            else lm_head.to(device=self.device, dtype=dtype)
        )
        # computed in fp32, then held in the model dtype, as transformers does
        cos, sin = rope_tables(self.config, self.max_model_len, self.device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.scale = s.head_dim**-0.5
        # The Triton kernel on CUDA (see serve.kernels), else the plain-torch reference.
        self.use_triton = use_triton
        self.attention = paged_attention
        if use_triton:
            from serve.kernels.paged_attention import paged_attention_triton

            self.attention = paged_attention_triton

    def forward(
        self, input_ids: torch.Tensor, ctx, kv_cache: torch.Tensor, adapters
    ) -> torch.Tensor:
        """Hidden states of every token of the step: [num_tokens, hidden].

        input_ids: [num_tokens]; ctx: ForwardContext (its `lora`: the step's LoraBatch, None
        when no token has an adapter); kv_cache: [layers, 2, slots, kv_heads, head_dim];
        adapters: the AdapterPool whose slots `ctx.lora` indexes.
        """
        s = self.shape
        n = input_ids.shape[0]
        # index_select rather than advanced indexing: whole-row copies, faster on CPU
        x = self.embed.index_select(0, input_ids)  # [n, hidden]
        positions = ctx.attention.positions
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # [n, 1, head_dim]
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, s.rms_norm_eps)
            q, k, v = self._proj(layer, i, QKV, h, adapters, ctx)
            if layer.qk_norms is not None:
                q_norm, k_norm = layer.qk_norms
                q = rms_norm(q.view(n, s.num_heads, s.head_dim), q_norm, s.rms_norm_eps)
                k = rms_norm(k.view(n, s.num_kv_heads, s.head_dim), k_norm, s.rms_norm_eps)
            # RoPE on q and k heads together: one set of elementwise ops instead of two
            qk = torch.cat((q.view(n, -1), k.view(n, -1)), dim=-1)
            qk = qk.view(n, s.num_heads + s.num_kv_heads, s.head_dim)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split((s.num_heads, s.num_kv_heads), dim=1)
            v = v.reshape(n, s.num_kv_heads, s.head_dim)
            attn = self.attention(
                q, k, v, kv_cache[i, 0], kv_cache[i, 1], ctx.attention, self.scale
            )
            [o] = self._proj(layer, i, OUT, attn.reshape(n, -1), adapters, ctx)
            x = x + o
            h = rms_norm(x, layer.post_norm, s.rms_norm_eps)
            gate, up = self._proj(layer, i, GATE_UP, h, adapters, ctx)
            [down] = self._proj(layer, i, DOWN, F.silu(gate) * up, adapters, ctx)
            x = x + down
        return rms_norm(x, self.norm, s.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] in fp32."""
        return linear(hidden, self.lm_head).float()

    def _proj(self, layer, i, modules, x, adapters, ctx) -> list[torch.Tensor]:
        """Base projections of `modules` (all reading x), each plus its LoRA delta in place."""
        outs = []
        for group in dict.fromkeys(layer.group_of[m] for m in modules):
            y = layer.linears[group](x)
            outs += list(y.split(layer.widths[group], dim=-1)) if len(group) > 1 else [y]
        if ctx.lora is not None:
            adapters.apply_modules(outs, x, i, modules, ctx.lora)
        return outs

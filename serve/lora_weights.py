"""One LoRA adapter in host memory (`LoraWeights`), read and checked from its PEFT folder.

The layout is the one a device slot holds, so a slot load is a copy per module: every layer's
A [r, in] and B [out, r], scaled and transposed once here, zero-padded past each layer's rank.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import regex
import torch

from registry.errors import AdapterError
from registry.lineage import adapter_config
from serve.llama import LORA_MODULES, PARENT_OF, ModelShape

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """One adapter in host memory, laid out as a slot holds it: a slot load is two copies per
    module (from page-locked memory when the slots are on a GPU), no per-layer work."""

    uid: str
    path: Path
    # module -> A [layers, r, in] and B [layers, r, out] (= scale · lora_Bᵀ) in the slots'
    # dtype, r the module's largest rank over the layers, zero past each layer's own rank
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    ranks: dict[str, list[int]]  # module -> its rank in each layer (0: not targeted there)
    stamp: str = ""  # digest of the files' bytes as they were read (`content_stamp`)

    @property
    def rank(self) -> int:
        return max(max(r) for r in self.ranks.values())

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)


def content_stamp(config: bytes, weights: bytes) -> str:
    """What changes when an adapter folder's files are rewritten: a digest of their bytes.

    Not their sizes and times: another adapter of the same shape has the same sizes, and a copy
    that keeps times (`cp -p`, `rsync -a`, an archive) can give it the same times too; the
    digest is of the bytes parsed, so a rewrite while they are read cannot pass for them."""
    digest = hashlib.blake2b(len(config).to_bytes(8, "little") + config, digest_size=16)
    digest.update(weights)
    return digest.hexdigest()


def read_peft_lora(
    path: Path,
    uid: str,
    shape: ModelShape,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
) -> LoraWeights:
    """Read and check a PEFT LoRA folder against the base's shapes and the engine's limits;
    held in `dtype`, in page-locked memory with `pin_memory` (slots on a GPU)."""
    from safetensors.torch import load

    name = f"adapter {uid!r}"
    config_file = path / "adapter_config.json"
    config_bytes = config_file.read_bytes()  # an OSError is the caller's (a read-back's)
    try:
        config = adapter_config(config_file, config_bytes)
    except AdapterError as error:
        raise AdapterError(f"{name}: {error}") from None
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise AdapterError(
            f"{name}: {config_file}: alpha_pattern must be an object (got {patterns!r})"
        )
    for pattern in patterns:
        try:  # as peft compiles it: `re` (`regex` would take some patterns peft refuses)
            re.compile(_peft_match(pattern))
        except re.error as error:
            raise AdapterError(
                f"{name}: {config_file}: alpha_pattern key {pattern!r} is not a regex: {error}"
            ) from None
    alphas = [config.get("lora_alpha"), *patterns.values()]
    if not all(_finite_number(a) for a in alphas):  # JSON as Python reads it: NaN, 1e999
        raise AdapterError(
            f"{name}: {config_file}: lora_alpha (and alpha_pattern's values) must be finite "
            f"numbers (got {config.get('lora_alpha')!r}, {list(patterns.values())!r})"
        )
    if config.get("use_dora"):
        raise AdapterError(f"{name}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{name}: adapters that train biases are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{name}: modules_to_save ({config['modules_to_save']}) is not supported"
        )
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterError(f"{name}: {path} has no adapter_model.safetensors")
    # Shapes from the header first: a file of the wrong shapes is refused before its tensors
    # are read (a 2 GiB one took 18 GiB to refuse).
    pairs = _checked_pairs(name, file, shape, max_rank)
    data = file.read_bytes()  # once: the stamp is of the very bytes parsed
    try:
        state = load(data)
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise AdapterError(f"{name}: {file} is not a readable safetensors file ({error})") from None
    tensors = {}
    for (layer, module), ab in pairs.items():
        a, b = (state.get(key) for key in ab)
        if a is None or b is None or [list(a.shape), list(b.shape)] != list(ab.values()):
            raise AdapterError(f"{name}: {file} changed while it was read")
        a, b, rank = a.float(), b.float(), a.shape[0]
        if not (a.isfinite().all() and b.isfinite().all()):
            raise AdapterError(f"{name}: layer {layer} {module} has NaN or infinite weights")
        # the module's name as peft matches alpha_pattern keys against it
        key = f"model.layers.{layer}.{PARENT_OF[module]}.{module}"
        alpha = _pattern(name, patterns, key, config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors[(layer, module)] = (a, b, scale)
    weights = slot_layout(uid, path, tensors, shape, dtype, pin_memory)
    weights.stamp = content_stamp(config_bytes, data)
    return weights


def _checked_pairs(name: str, file: Path, shape: ModelShape, max_rank: int) -> dict:
    """(layer, module) -> {A's key: its shape, B's key: its shape} of each LoRA pair in the
    file, read from the safetensors header and checked against the base and `max_rank`."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise AdapterError(f"{name}: {file} is not a readable safetensors file ({error})") from None
    pairs: dict[tuple[int, str], dict[str, str]] = {}  # (layer, module) -> A or B -> key
    unsupported = set()
    for key in shapes:
        match = _KEY.search(key)
        if match is None or match[2] not in LORA_MODULES:
            unsupported.add(key.split(".lora_")[0].rsplit(".", 1)[-1])
            continue
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = key
    if unsupported:
        raise AdapterError(
            f"{name}: unsupported target modules {sorted(unsupported)}; "
            f"served: {', '.join(LORA_MODULES)}"
        )
    checked = {}
    for (layer, module), ab in sorted(pairs.items()):
        if len(ab) != 2:  # peft writes both or neither
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{name}: layer {layer} {module} has no {missing} weight")
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        if len(a) != 2 or len(b) != 2 or a[0] == 0:
            raise AdapterError(
                f"{name}: layer {layer} {module} has A {a}, B {b}: "
                "LoRA weights are matrices of rank 1 or more"
            )
        rank = a[0]
        if rank > max_rank:
            raise AdapterError(f"{name}: rank {rank} is over max_lora_rank {max_rank}")
        fan_in, fan_out = shape.lora_dims(module)
        if layer >= shape.num_layers or a != [rank, fan_in] or b != [fan_out, rank]:
            raise AdapterError(
                f"{name}: layer {layer} {module} has A {a}, B {b}; "
                f"this base needs A [{rank}, {fan_in}], B [{fan_out}, {rank}] "
                f"over {shape.num_layers} layers"
            )
        checked[(layer, module)] = {ab["A"]: a, ab["B"]: b}
    if not checked:
        raise AdapterError(f"{name}: {file.parent} holds no LoRA weights")
    return checked


def slot_layout(
    uid, path, tensors, shape: ModelShape, dtype, pin_memory: bool = False
) -> LoraWeights:
    """(layer, module) -> (A [r, in], B [out, r], scale) stacked per module over the layers,
    B scaled and transposed (in fp32, then rounded once to `dtype`, as a slot stores it)."""
    ranks: dict[str, list[int]] = {}
    for (layer, m), (a, _, _) in tensors.items():
        ranks.setdefault(m, [0] * shape.num_layers)[layer] = a.shape[0]
    A, B = {}, {}
    for m, per_layer in ranks.items():
        fan_in, fan_out = shape.lora_dims(m)
        size = (shape.num_layers, max(per_layer))
        A[m] = torch.zeros(*size, fan_in, dtype=dtype, pin_memory=pin_memory)
        B[m] = torch.zeros(*size, fan_out, dtype=dtype, pin_memory=pin_memory)
    for (layer, m), (a, b, scale) in tensors.items():
        r = a.shape[0]
        A[m][layer, :r] = a
        B[m][layer, :r] = b.T * scale
        # finite in fp32, perhaps not once scaled and rounded to the slot's dtype
        for name, held in (
            ("lora_A", A[m][layer, :r]),
            (f"lora_B times its scale ({scale:g})", B[m][layer, :r]),
        ):
            if not held.isfinite().all():
                raise AdapterError(
                    f"adapter {uid!r}: layer {layer} {m}: {name} overflows "
                    f"{str(dtype).removeprefix('torch.')}"
                )
    return LoraWeights(uid, path, A, B, ranks)


def _finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


# An adapter's alpha_pattern keys are regexes from whoever wrote the adapter: one that
# backtracks without end would hold the server (and, under `re`, the GIL) for ever.
_MATCH_TIMEOUT_S = 0.1


def _pattern(name: str, patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        try:
            if regex.match(_peft_match(pattern), key, timeout=_MATCH_TIMEOUT_S):
                return value
        except TimeoutError:
            raise AdapterError(
                f"{name}: alpha_pattern key {pattern!r} takes over {_MATCH_TIMEOUT_S} s to match "
                f"{key!r}"
            ) from None
    return default


def _peft_match(pattern: str) -> str:
    """What peft matches a module's name with: the key as a group, for `a|b` keys. Matched
    here by `regex`, which can stop a match at a timeout (`re` cannot)."""
    return rf"(.*\.)?({pattern})$"

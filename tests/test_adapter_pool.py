"""The adapter host tier's slot layout and slot loads, with ranks and scales that vary by layer."""

from __future__ import annotations

import pytest
import torch

from serve.adapter_pool import AdapterPool
from serve.llama import LORA_MODULES, ModelShape
from serve.lora_weights import read_peft_lora
from tests.helpers import make_adapter


@pytest.fixture(scope="module")
def patterned(tiny_base, tmp_path_factory):
    """A PEFT adapter on q_proj (rank 4, but 2 in layer 1) and down_proj (alpha 3 in layer
    0, else 8), with its state dict."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"layers.0.mlp.down_proj": 3},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    folder = tmp_path_factory.mktemp("patterned")
    get_peft_model(model, config).save_pretrained(folder)
    return folder, load_file(str(folder / "adapter_model.safetensors"))


def _peft(state, layer, module, ab):
    parent = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return state[f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{ab}.weight"]


def _shape(tiny_base):
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(tiny_base.path))


def test_host_tier_holds_each_module_as_a_slot_does(tiny_base, patterned):
    folder, state = patterned
    weights = read_peft_lora(folder, "p#1", _shape(tiny_base), max_rank=8, dtype=torch.float16)
    assert weights.modules == ["down_proj", "q_proj"] and weights.rank == 4
    assert weights.ranks == {"q_proj": [4, 2], "down_proj": [4, 4]}
    A, B = weights.A["q_proj"], weights.B["q_proj"]
    assert A.dtype == torch.float16 and A.shape == (2, 4, 64) and B.shape == (2, 4, 64)
    a, b = _peft(state, 1, "q_proj", "A"), _peft(state, 1, "q_proj", "B")
    assert torch.equal(A[1, :2], a.half()) and torch.equal(B[1, :2], (b.T * 8 / 2).half())
    assert not A[1, 2:].any() and not B[1, 2:].any()  # zero past layer 1's rank
    b0, b1 = _peft(state, 0, "down_proj", "B"), _peft(state, 1, "down_proj", "B")
    assert torch.equal(weights.B["down_proj"][0], (b0.T * 3 / 4).half())  # alpha_pattern
    assert torch.equal(weights.B["down_proj"][1], (b1.T * 8 / 4).half())


def test_a_pattern_with_alternatives_scales_every_module_it_names_as_peft_does(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "o_proj"],
        alpha_pattern={"q_proj|v_proj": 64},  # a regex: peft matches it as one group
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path)
    weights = read_peft_lora(tmp_path, "p#2", _shape(tiny_base), max_rank=4, dtype=torch.float32)
    layer = peft_model.base_model.model.model.layers[0].self_attn
    for module in ("q_proj", "v_proj", "o_proj"):
        lora = getattr(layer, module)
        scale = lora.scaling["default"]
        assert scale == (16.0 if module != "o_proj" else 1.0)
        expected = lora.lora_B["default"].weight.detach().T * scale
        torch.testing.assert_close(weights.B[module][0], expected, rtol=0, atol=0)


def test_slot_load_replaces_a_larger_adapter_entirely(tiny_base, patterned):
    folder, _ = patterned
    shape = _shape(tiny_base)
    pool = AdapterPool(shape, 3, 8, 4, torch.float32, "cpu")
    weights = read_peft_lora(folder, "p#1", shape, 8)
    # a rank-8 adapter on every module in slot 1 first: nothing of it may survive
    full = {m: torch.ones(shape.num_layers, 8, shape.lora_dims(m)[0]) for m in LORA_MODULES}
    stale = type(weights)(
        "big#1",
        folder,
        full,
        {m: torch.ones(shape.num_layers, 8, shape.lora_dims(m)[1]) for m in LORA_MODULES},
        {m: [8] * shape.num_layers for m in LORA_MODULES},
    )
    for w in (stale, weights):
        pool.keep(w)
        pool.load_slot(1, w.uid)
    for m in LORA_MODULES:
        expected_A = torch.zeros(shape.num_layers, 8, shape.lora_dims(m)[0])
        expected_B = torch.zeros(shape.num_layers, 8, shape.lora_dims(m)[1])
        if m in weights.A:
            expected_A[:, :4], expected_B[:, :4] = weights.A[m], weights.B[m]
        assert torch.equal(pool.A[m][:, 1], expected_A), m
        assert torch.equal(pool.B[m][:, 1], expected_B), m
        ranks = weights.ranks.get(m, [0, 0])
        assert pool.rank_table[m][:, 1].tolist() == ranks
        assert [r[1] for r in pool.ranks[m]] == ranks
        assert not pool.A[m][:, 0].any() and not pool.A[m][:, 2].any()  # other slots untouched


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no lora_alpha", "lora_alpha .* must be finite numbers"),
        ("lora_alpha a string", "lora_alpha .* must be finite numbers"),
        ("lora_alpha NaN", r"must be finite numbers \(got nan"),  # Python's JSON reads NaN
        ("lora_alpha past float", "must be finite numbers"),  # it raised OverflowError
        ("alpha_pattern value infinite", r"must be finite numbers \(got 8, \[inf\]\)"),
        ("config not JSON", "adapter_config.json is not valid JSON"),
        ("lora_B missing", "layer 0 q_proj has no lora_B weight"),
        ("alpha_pattern a list", "alpha_pattern must be an object"),
        ("alpha_pattern not a regex", "alpha_pattern key 'q_proj\\(' is not a regex"),
        ("alpha_pattern flags mid-regex", "alpha_pattern key '\\(\\?i\\)Q_PROJ' is not"),
        # it backtracked without end, holding the GIL: the server stopped answering
        ("alpha_pattern backtracking", r"alpha_pattern key .* takes over 0.1 s to match"),
        ("rank 0", r"layer 0 q_proj has A \[0, 64\], B \[64, 0\]: LoRA weights are matrices"),
        ("a scalar", r"layer 0 q_proj has A \[\], .*: LoRA weights are matrices of rank 1"),
        ("NaN weights", "layer 0 q_proj has NaN or infinite weights"),
    ],
)
def test_a_broken_adapter_folder_is_an_adapter_error_naming_what_is_wrong(
    tiny_base, patterned, tmp_path, breakage, message
):
    import json
    import shutil

    from safetensors.torch import save_file

    from registry.errors import AdapterError

    source, state = patterned
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if breakage == "no lora_alpha":
        del config["lora_alpha"]
    elif breakage == "lora_alpha a string":
        config["lora_alpha"] = "32"
    elif breakage == "lora_alpha NaN":
        config["lora_alpha"] = float("nan")
    elif breakage == "lora_alpha past float":
        config["lora_alpha"] = 10**400
    elif breakage == "alpha_pattern value infinite":
        config["alpha_pattern"] = {"q_proj": float("inf")}
    elif breakage == "alpha_pattern a list":
        config["alpha_pattern"] = ["q_proj"]
    elif breakage == "alpha_pattern not a regex":
        config["alpha_pattern"] = {"q_proj(": 4}
    elif breakage == "alpha_pattern flags mid-regex":  # valid alone; not as peft matches it
        config["alpha_pattern"] = {"(?i)Q_PROJ": 4}
    elif breakage == "alpha_pattern backtracking":
        config["alpha_pattern"] = {"(.|.)*[^j]": 4}
    config_file.write_text(json.dumps(config))
    if breakage == "config not JSON":
        config_file.write_text("{not json")
    elif breakage == "lora_B missing":
        kept = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
        save_file(kept, str(folder / "adapter_model.safetensors"))
    elif breakage in ("rank 0", "a scalar", "NaN weights"):
        key = "layers.0.self_attn.q_proj.lora_"
        broken = {
            "rank 0": lambda k, v: v[:0] if "lora_A" in k else v[:, :0],
            "a scalar": lambda k, v: torch.tensor(1.0) if "lora_A" in k else v,
            "NaN weights": lambda k, v: torch.full_like(v, float("nan")),
        }[breakage]
        state = {k: broken(k, v).contiguous() if key in k else v for k, v in state.items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=message):
        read_peft_lora(folder, "broken", _shape(tiny_base), max_rank=8)


def test_tensors_of_the_wrong_shape_are_refused_from_the_header_before_they_are_read(
    tiny_base, tmp_path, monkeypatch
):
    """A large file of the wrong shapes took ~9x its size in memory to refuse: read whole,
    parsed, each tensor made fp32 and checked for NaN before its shape was."""
    import safetensors.torch
    from safetensors.torch import save_file

    from registry.errors import AdapterError

    folder = make_adapter(tiny_base, tmp_path / "big", seed=0, rank=4, targets=("q_proj",))
    huge = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(512, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 512),
        "base_model.model.model.layers.0.self_attn.q_proj.extra": torch.zeros(4),
    }
    for keep in (2, 3):  # over max_lora_rank; a tensor of no target module
        save_file(dict(list(huge.items())[:keep]), str(folder / "adapter_model.safetensors"))
        monkeypatch.setattr(safetensors.torch, "load", lambda data: pytest.fail("read"))
        message = "rank 512 is over max_lora_rank 8" if keep == 2 else "unsupported target"
        with pytest.raises(AdapterError, match=message):
            read_peft_lora(folder, "big", _shape(tiny_base), max_rank=8)


def test_weights_that_overflow_the_slot_dtype_once_scaled_are_refused(tiny_base, tmp_path):
    """Finite in fp32, infinite as a float16 slot holds them: every token's logits NaN."""
    import json

    from safetensors.torch import load_file, save_file

    from registry.errors import AdapterError

    folder = make_adapter(tiny_base, tmp_path / "big", seed=0, rank=4, targets=("q_proj",))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4e9}))
    shape = _shape(tiny_base)
    assert read_peft_lora(folder, "big", shape, max_rank=8).B["q_proj"].isfinite().all()
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: lora_B times its scale \(1e\+09\)"):
        read_peft_lora(folder, "big", shape, max_rank=8, dtype=torch.float16)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "layers.0." in k and "lora_A" in k)
    save_file({**weights, key: weights[key] * 1e6}, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: lora_A overflows float16"):
        read_peft_lora(folder, "big", shape, max_rank=8, dtype=torch.float16)

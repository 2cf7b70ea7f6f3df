"""On a CUDA GPU only: the engine's GPU path on the real SmolLM2, compiled kernels and CUDA
graphs against the plain-torch path. Skipped without CUDA (CI has none); the kernels' own
tests run everywhere (tests/test_kernels.py, interpreted on CPU).

The lent GPU machine cannot be sent the embedded SmolLM2 (98 MB); there the same test runs
on random weights of its shapes, prompts as token ids."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EMBEDDED_SMOLLM2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [
    "What is the capital of Norway?",
    "Do I need a building permit for a garden shed?",
    "Name three primary colours.",
]


@pytest.fixture(scope="module")
def base(request, home, tmp_path_factory):
    """SmolLM2, or (where it cannot be had) random weights of its shapes."""
    if EMBEDDED_SMOLLM2:
        return request.getfixturevalue("smollm2")
    from bench.gpu_model import SHAPES, write_random_base
    from registry.base_model import resolve_base_model

    folder = tmp_path_factory.mktemp("smollm2-shaped")
    write_random_base(folder, SHAPES["smollm2-135m"], "cuda", torch.float32)
    return resolve_base_model(str(folder), home)


@pytest.fixture(scope="module")
def prompts(base):
    if EMBEDDED_SMOLLM2:
        return PROMPTS
    return [[1, *range(40 + 7 * i, 60 + 11 * i)] for i in range(3)]  # word-level tokenizer


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    from serve.llama import LORA_MODULES
    from tests.helpers import make_lora

    root = tmp_path_factory.mktemp("gpu-adapters")
    return {
        "qv": make_lora(base, root / "qv", rank=8, targets=["q_proj", "v_proj"]),
        "all": make_lora(
            base,
            root / "all",
            rank=16,
            targets=LORA_MODULES,
            seed=1,
        ),
    }


def _generate(base, prompts, adapters, **options):
    from serve import LLM, SamplingParams

    # fp32: a set of compiles of its own, which a warm-up would make for every variant
    llm = LLM(base_model=str(base.path), device="cuda", dtype="float32", warmup=False, **options)
    for name, folder in adapters.items():
        llm.load_adapter(name, str(folder))
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    outs = llm.generate(prompts * 2, params, adapters=["qv", None, "all", "all", "qv", None])
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs]


def test_kernels_and_cuda_graphs_give_the_reference_tokens_on_smollm2(base, prompts, adapters):
    """NF4 base in fp32: bitsandbytes + SDPA + gathered LoRA, step by step, against the Triton
    kernels, eager and replayed from CUDA graphs, with each step's outputs made while the next
    step's forward pass runs (the CUDA default)."""
    reference = _generate(base, prompts, adapters, kernels="reference", overlap_outputs=False)
    kernels = _generate(base, prompts, adapters, kernels="auto")
    graphs = _generate(base, prompts, adapters, kernels="auto", cuda_graphs=True)
    for tokens, logprobs in (kernels, graphs):
        assert tokens == reference[0]
        for ours, theirs in zip(logprobs, reference[1], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_every_decode_graph_is_captured_at_start_and_serving_captures_none(base, prompts, adapters):
    from serve import LLM, SamplingParams
    from serve.cuda_graph import batch_sizes

    llm = LLM(
        base_model=str(base.path),
        device="cuda",
        cuda_graphs=True,
        max_num_seqs=12,
        kv_cache_memory_gb=1,
        warmup=False,  # its own test, last
    )
    graphs = llm.engine.runner.graphs
    expected = {(size, lora) for size in batch_sizes(12) for lora in (False, True)}
    assert set(graphs.steps) == expected
    assert all(step.graph is not None for step in graphs.steps.values())
    for name, folder in adapters.items():
        llm.load_adapter(name, str(folder))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts * 3, params, adapters=["qv", None, "all"] * 3)
    assert all(len(o.token_ids) == 6 for o in outs)
    assert set(graphs.steps) == expected  # 9 decoding sequences replayed at 12: no capture


def test_bf16_kernels_score_like_the_reference_ops(base, prompts, adapters):
    """bf16, the GPU default: the Triton kernels and the plain ops score every prompt token
    alike within bf16's rounding (greedy tokens may part ways on near-ties)."""
    from serve import LLM, SamplingParams

    scored = []
    for kernels in ("reference", "auto"):
        llm = LLM(base_model=str(base.path), device="cuda", kernels=kernels, kv_cache_memory_gb=1)
        for name, folder in adapters.items():
            llm.load_adapter(name, str(folder))
        params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)
        outs = llm.generate(prompts, params, adapters=["qv", None, "all"])
        scored.append([[lp.logprob for lp in o.prompt_logprobs[1:]] for o in outs])
    for ours, reference in zip(scored[1], scored[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("rows", [1, 16, 64, 300])
def test_nf4_kernel_agrees_with_bitsandbytes_in_bf16(rows):
    from serve.linear import Linear4bit, PackedLinear4bit

    gen = torch.Generator(device="cuda").manual_seed(rows)
    weights = [
        torch.randn(o, 2048, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        for o in (2048, 512, 512)
    ]
    x = torch.randn(rows, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    stacked = PackedLinear4bit(weights, [None] * 3, "nf4", True, torch.bfloat16)(x)
    one_by_one = [Linear4bit(w, None, "nf4", True, torch.bfloat16)(x) for w in weights]
    expected = torch.cat(one_by_one, dim=1).float()
    error = (stacked.float() - expected).abs().max() / expected.abs().max()
    assert error < 1e-2


def test_default_kv_pool_fills_the_gpu_to_its_utilization_and_no_further(base):
    """Without kv_cache_memory_gb the pool takes what 0.9 of the GPU leaves after the weights
    and the largest step; a second engine allowed half the GPU then finds no room and says
    so."""
    from registry.errors import UsageError
    from serve import LLM, SamplingParams
    from serve.kv_budget import kv_block_bytes

    llm = LLM(base_model=str(base.path), device="cuda", max_num_batched_tokens=2048, warmup=False)
    engine = llm.engine
    _, total = torch.cuda.mem_get_info()
    pool = engine.num_blocks * kv_block_bytes(engine.model.shape, 16, torch.bfloat16)
    assert 0.5 * total < pool < 0.9 * total  # a 135M model leaves most of the GPU to the pool
    torch.cuda.reset_peak_memory_stats()
    llm.generate(["x " * 2000] * 4, SamplingParams(max_tokens=4, prompt_logprobs=1))
    assert torch.cuda.max_memory_reserved() <= 0.9 * total  # the largest steps stayed inside
    with pytest.raises(UsageError, match=r"gpu_memory_utilization 0\.5 .* no room"):
        LLM(base_model=str(base.path), device="cuda", gpu_memory_utilization=0.5)


def test_serving_compiles_no_kernel_after_the_warmup(base, prompts, adapters):
    """The start-up warm-up (`serve.warmup`) compiles every kernel variant a step can ask for:
    serving decodes, prefill chunks past the 256 rows where the NF4 matmul dequantizes,
    mixed steps, with adapters and without, then compiles none. Last in the file: on a
    fresh machine its compiles take the longest."""
    from serve import LLM, SamplingParams
    from serve.kernels import kernel_compiles

    llm = LLM(base_model=str(base.path), device="cuda", max_num_seqs=12, kv_cache_memory_gb=1)
    assert llm.engine.warmup_seconds > 0
    for name, folder in adapters.items():
        llm.load_adapter(name, str(folder))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    long_prompt = list(range(3, 600))  # chunks of 512 (dequantized) and 85 tokens
    batch = [*prompts * 3, long_prompt]
    with kernel_compiles() as compiled:
        outs = llm.generate(batch, params, adapters=["qv", None, "all"] * 3 + ["all"])
        llm.generate(prompts, params)  # no adapter: no LoRA launch
    assert all(len(o.token_ids) == 6 for o in outs)
    assert dict(compiled) == {}

"""The engine against transformers + peft on the real SmolLM2: greedy tokens must match exactly,
however the batch is formed (mixed adapters, joining mid-flight, chunked prefill, preemption,
prefix-cache hits, evicted adapters) and with the NF4 base against peft over bitsandbytes."""

from __future__ import annotations

import pytest

from serve import LLM, SamplingParams
from tests.helpers import make_lora, peft_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
QUESTIONS = [
    "What is the capital of Norway?",
    "How long does it take to get a building permit in Sweden?",
    "Name three colours of the rainbow.",
    "Which countries border Peru?",
    "Write one sentence about the sea.",
    "What is a bygglov?",
    "How many legs does a spider have?",
    "Give me a short tip for learning Python, in a few words please.",
]
# Distinct ranks, target modules, alphas and rsLoRA; None is the base model.
ADAPTERS = {
    "r4-qv": dict(rank=4, targets=["q_proj", "v_proj"]),
    "r8-all": dict(
        rank=8,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "r16-mlp-rs": dict(
        rank=16, targets=["o_proj", "gate_proj", "up_proj", "down_proj"], rslora=True
    ),
    "r2-kv": dict(rank=2, targets=["k_proj", "v_proj"], alpha=8),
}
NAMES = ["r4-qv", "r8-all", None, "r16-mlp-rs", "r2-kv", "r8-all", None, "r4-qv"]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def folders(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-adapters")
    return {
        name: make_lora(smollm2, root / name, seed=i, **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rendered = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        rendered.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return rendered


@pytest.fixture(scope="module")
def reference(smollm2, folders, prompts):
    return peft_greedy(smollm2, folders, prompts, NAMES, MAX_TOKENS)


def make_llm(smollm2, folders, quantization=None, **kwargs) -> LLM:
    llm = LLM(base_model=str(smollm2.path), quantization=quantization, max_lora_rank=16, **kwargs)
    for name, folder in folders.items():
        llm.load_adapter(name, str(folder))
    return llm


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def test_mixed_adapter_batch_matches_peft(smollm2, folders, prompts, reference):
    llm = make_llm(smollm2, folders)
    outputs = llm.generate(prompts, GREEDY, adapters=NAMES)
    assert tokens(outputs) == reference
    assert [o.adapter for o in outputs] == NAMES
    # The adapters really change the output: not every adapter row equals the base's tokens.
    base_only = llm.generate(prompts, GREEDY)
    assert tokens(base_only) != reference


def test_requests_joining_mid_flight_and_chunked_prefill_match_peft(
    smollm2, folders, prompts, reference
):
    # A 24-token budget: prompts of ~40 tokens are prefilled in chunks while others decode.
    llm = make_llm(smollm2, folders, max_num_batched_tokens=24)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY, n) for p, n in zip(prompts[:3], NAMES[:3], strict=True)]
    final = {}
    steps = 0
    while engine.has_unfinished or len(ids) < len(prompts):
        if steps in (3, 6, 9, 12, 15) and len(ids) < len(prompts):
            i = len(ids)
            ids.append(engine.add_request(prompts[i], GREEDY, NAMES[i]))
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        steps += 1
    assert [final[i] for i in ids] == reference


def test_preempted_sequences_resume_with_identical_tokens(smollm2, folders, prompts, reference):
    llm = make_llm(smollm2, folders, num_kv_blocks=12, block_size=8)
    outputs = llm.generate(prompts, GREEDY, adapters=NAMES)
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens(outputs) == reference
    assert llm.engine.allocator.num_free_blocks == 12  # everything released at the end


def test_prefix_cache_hits_reuse_blocks_only_within_one_adapter_version(
    smollm2, folders, prompts, reference
):
    llm = make_llm(smollm2, folders)
    first = llm.generate(prompts, GREEDY, adapters=NAMES)
    again = llm.generate(prompts, GREEDY, adapters=NAMES)
    assert tokens(first) == tokens(again) == reference
    assert all(o.num_cached_tokens > 0 for o in again)
    # A new prompt (its own system message: no block shared with the ones above).
    messages = [
        {"role": "system", "content": "Answer in exactly one short line, always."},
        {"role": "user", "content": QUESTIONS[0]},
    ]
    fresh = llm.render_chat(messages)
    [a] = llm.generate([fresh], GREEDY, adapters=["r2-kv"])
    [b] = llm.generate([fresh], GREEDY, adapters=["r4-qv"])
    [c] = llm.generate([fresh], GREEDY, adapters=["r2-kv"])
    [d] = llm.generate([fresh], GREEDY)
    assert (a.num_cached_tokens, b.num_cached_tokens, d.num_cached_tokens) == (0, 0, 0)
    assert c.num_cached_tokens == (len(fresh) - 1) // 16 * 16
    assert c.token_ids == a.token_ids


def test_evicted_adapters_reload_and_give_the_same_tokens(smollm2, folders, prompts, reference):
    # Two device slots and two host copies for four adapters: slots and host memory churn.
    llm = make_llm(smollm2, folders, max_loras=2, max_cpu_loras=2)
    outputs = llm.generate(prompts, GREEDY, adapters=NAMES)
    assert tokens(outputs) == reference
    stats = llm.engine.stats
    assert stats["adapter_slot_evictions"] > 0
    assert stats["adapter_host_evictions"] > 0


@pytest.mark.parametrize("keep_quantized", [False, True], ids=["dequantized-once", "packed"])
def test_nf4_base_matches_peft_over_bitsandbytes(
    smollm2, folders, prompts, nf4_reference, keep_quantized
):
    llm = make_llm(smollm2, folders, quantization="nf4", keep_quantized=keep_quantized)
    assert tokens(llm.generate(prompts, GREEDY, adapters=NAMES)) == nf4_reference


@pytest.fixture(scope="module")
def nf4_reference(smollm2, folders, prompts):
    return peft_greedy(smollm2, folders, prompts, NAMES, MAX_TOKENS, quantized=True)

"""The engine under a tiny KV pool and token budget against each request run alone.

Random requests (shared prefixes, the base and adapters of mixed ranks, seeded sampling,
stop strings and tokens, several copies of one prompt) arrive between steps and some are
aborted, so that chunked prefill, preemption, prefix-cache hits and slot and host evictions
all happen. Every request that finishes must give exactly what it gives alone on a roomy
engine without a prefix cache, and once all are done every block and slot is back.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from serve import LLM, SamplingParams
from tests.helpers import TINY_SHAPE, make_lora, tiny_engine_args

VOCAB = TINY_SHAPE["vocab_size"]
SPECS = [  # rank, targets: mixed ranks and modules
    (2, ("q_proj", "v_proj")),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (8, ("up_proj", "down_proj")),
]
NAMES = ["a", "b", "c"]
MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def folders(tiny_base, tmp_path_factory):
    return [
        make_lora(tiny_base, tmp_path_factory.mktemp(f"lora-{i}"), rank=r, targets=t, seed=i)
        for i, (r, t) in enumerate(SPECS)
    ]


@pytest.fixture(scope="module")
def alone(tiny_base, folders):
    """(prompt, adapter, params) -> (tokens, text, finish reason) of the request run alone."""
    llm = LLM(
        **tiny_engine_args(
            tiny_base, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False, max_loras=3
        )
    )
    for name, folder in zip(NAMES, folders, strict=True):
        llm.load_adapter(name, str(folder))
    known = {}

    def run(prompt: list[int], adapter: str | None, params: SamplingParams):
        key = (tuple(prompt), adapter, params)
        if key not in known:
            [out] = llm.generate([prompt], params, adapters=[adapter])
            known[key] = out.token_ids, out.text, out.finish_reason
        return known[key]

    return run


def _requests(rng: random.Random) -> list[tuple[int, list[int], str | None, SamplingParams]]:
    """(step it arrives at, prompt, adapter, params), in arrival order."""
    prefixes = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 20))] for _ in "ab"]
    requests = []
    for _ in range(rng.randrange(6, 12)):
        prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else [1]
        prompt += [rng.randrange(3, VOCAB) for _ in range(rng.randrange(0, 12))]
        greedy = rng.random() < 0.7
        params = SamplingParams(
            max_tokens=rng.randrange(1, 20),
            temperature=0.0 if greedy else 0.8,
            seed=None if greedy else rng.randrange(4),  # unseeded draws depend on the batch
            ignore_eos=rng.random() < 0.5,
            repetition_penalty=rng.choice([1.0, 1.3]),
        )
        adapter = rng.choice([None, *NAMES])
        arrives = rng.randrange(20)
        for copy in range(rng.choice([1, 1, 1, 2, 3])):  # n choices: one prompt, seeds offset
            seed = None if params.seed is None else params.seed + copy
            requests.append((arrives, prompt, adapter, dataclasses.replace(params, seed=seed)))
    return sorted(requests, key=lambda r: r[0])


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlap-outputs"])
@pytest.mark.parametrize("seed", range(2, 6))  # seeds that preempt, hit and evict
def test_every_request_gives_what_it_gives_alone_and_everything_comes_back(
    tiny_base, folders, alone, seed, overlap
):
    rng = random.Random(seed)
    llm = LLM(
        **tiny_engine_args(
            tiny_base,
            num_kv_blocks=12,  # 48 tokens: one longest sequence, so newer ones are preempted
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=4,
            max_num_batched_tokens=8,  # prompts prefill in chunks
            max_loras=2,  # fewer slots than adapters
            max_cpu_loras=2,  # and fewer host copies: evicted ones are read again
            overlap_outputs=overlap,
        )
    )
    engine = llm.engine
    for name, folder in zip(NAMES, folders, strict=True):
        engine.load_adapter(name, str(folder))
    pending = _requests(rng)
    asked, aborted, final = {}, set(), {}
    step = 0
    while pending or engine.has_unfinished:
        while pending and pending[0][0] <= step:
            _, prompt, adapter, params = pending.pop(0)
            if params.greedy and rng.random() < 0.4:  # a stop string or token that it meets
                tokens, text, _ = alone(prompt, adapter, params)
                if rng.random() < 0.5:
                    params = dataclasses.replace(params, stop_token_ids=[rng.choice(tokens)])
                elif len(text) > 3:
                    start = rng.randrange(len(text) - 2)
                    params = dataclasses.replace(params, stop=[text[start : start + 2]])
            asked[engine.add_request(prompt, params, adapter)] = prompt, adapter, params
        if engine.requests and rng.random() < 0.05:
            request_id = rng.choice(sorted(engine.requests))
            finished = engine.requests[request_id].seq.is_finished  # its last output to come
            ended = engine.abort(request_id)
            assert (ended is None) == finished, request_id
            if ended is not None:
                assert ended.finished and ended.finish_reason == "abort"
                aborted.add(request_id)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 2000, "the engine stopped making progress"

    s = engine.scheduler
    assert s.num_preemptions and engine.scheduler.prefix_hit_blocks and engine.slots.evictions
    for request_id, (prompt, adapter, params) in asked.items():
        if request_id not in aborted:
            out = final[request_id]
            got = out.token_ids, out.text, out.finish_reason
            assert got == alone(prompt, adapter, params), (request_id, adapter, params)
    allocator = engine.allocator
    assert allocator.num_free_blocks == allocator.num_blocks
    assert not any(allocator.ref_counts) and not allocator._hashes
    assert all(allocator.block_hash[block] == h for h, block in allocator.cached.items())
    assert not engine.slots.pins and not engine.requests and not engine.sampler._seeded

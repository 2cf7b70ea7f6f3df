"""The whole engine on the tiny base under random interleavings (hypothesis): requests of every
kind, bad requests, aborts, adapters loaded, replaced and unloaded while requests use them.

Step by step, and with each step's outputs made during the next one's forward pass. What must
hold at every point: a bad request raises before it changes anything, every step runs,
per-request state (requests, seeded generators, grammar states, prefix hashes) exists only for
requests in flight, and once requests stop arriving every one of them finishes and the KV
blocks and adapter slots are all released.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from registry.errors import NotFoundError, UsageError
from serve import LLM, SamplingParams
from serve.response_format import ResponseFormat
from tests.helpers import TINY_SHAPE, make_lora, tiny_engine_args

VOCAB = TINY_SHAPE["vocab_size"]
NAMES = ["a", "b", "c"]
SPECS = [  # rank, targets: mixed ranks and modules
    (2, ("q_proj", "v_proj")),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (8, ("up_proj", "down_proj")),
]

PARAMS = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 24),
    ignore_eos=st.booleans(),
    temperature=st.sampled_from([0.0, 0.8]),
    top_p=st.sampled_from([1.0, 0.9]),
    seed=st.none() | st.integers(0, 3),
    logprobs=st.none() | st.just(2),
    prompt_logprobs=st.none() | st.just(1),
    repetition_penalty=st.sampled_from([1.0, 1.2]),
    stop=st.sampled_from([[], ["e"], ["a", " t"]]),  # random text meets them soon
    response_format=st.none() | st.just(ResponseFormat()),  # a JSON object
)
REQUESTS = st.tuples(
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=50),  # prompt ids
    st.sampled_from([None, *NAMES]),  # adapter
    PARAMS,
)


@pytest.fixture(scope="module")
def folders(tiny_base, tmp_path_factory):
    return [
        make_lora(tiny_base, tmp_path_factory.mktemp(f"lora-{i}"), rank=r, targets=t, seed=i)
        for i, (r, t) in enumerate(SPECS)
    ]


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlap-outputs"])
def test_engine_keeps_serving_and_releases_everything_under_random_interleavings(
    tiny_base, folders, overlap
):
    args = tiny_engine_args(
        tiny_base,
        num_kv_blocks=16,  # 64 tokens, one max_model_len: preemption and cache eviction happen
        max_num_seqs=4,
        max_num_batched_tokens=16,
        max_loras=2,  # fewer slots than adapters
        max_cpu_loras=2,  # and fewer host copies: evicted ones are read again
        max_model_len=64,
        overlap_outputs=overlap,  # outputs made during the next step's forward pass
    )

    class EngineStates(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.engine = engine = LLM(**args).engine  # a fresh one: examples replay exactly
            for name, folder in zip(NAMES, folders, strict=True):
                engine.load_adapter(name, str(folder))

        @rule(requests=st.lists(REQUESTS, min_size=1, max_size=4))
        def add(self, requests):
            engine = self.engine
            for prompt, adapter, params in requests:
                if adapter is not None and adapter not in engine.adapters:
                    with pytest.raises(NotFoundError, match=repr(adapter)):
                        engine.add_request(prompt, params, adapter)
                else:
                    engine.add_request(prompt, params, adapter)

        @rule(
            bad=st.sampled_from(
                [
                    ([], UsageError, "prompt is empty"),
                    ([5, VOCAB], UsageError, "outside the vocabulary"),
                    (list(range(3, 70)), UsageError, "context length"),
                ]
            )
        )
        def add_bad(self, bad):
            prompt, error, message = bad
            before = set(self.engine.requests)
            with pytest.raises(error, match=message):
                self.engine.add_request(prompt, SamplingParams())
            assert set(self.engine.requests) == before

        @precondition(lambda self: self.engine.requests)
        @rule(data=st.data())
        def abort(self, data):
            request_id = data.draw(st.sampled_from(sorted(self.engine.requests)))
            finished = self.engine.requests[request_id].seq.is_finished  # its last output due
            assert (self.engine.abort(request_id) is None) == finished

        @rule(name=st.sampled_from(NAMES), folder=st.integers(0, len(SPECS) - 1))
        def load(self, name, folder):  # a new name, or a new version under a loaded one
            self.engine.load_adapter(name, str(folders[folder]))

        @precondition(lambda self: self.engine.adapters)
        @rule(data=st.data())
        def unload(self, data):
            self.engine.unload_adapter(data.draw(st.sampled_from(sorted(self.engine.adapters))))

        @rule(steps=st.integers(1, 6))
        def step(self, steps):
            for _ in range(steps):
                self.engine.step()

        @invariant()
        def state_is_only_for_requests_in_flight(self):
            engine, s = self.engine, self.engine.scheduler
            in_flight = {q.request_id for q in [*s.running, *s.waiting]}
            # and, overlapping, those whose last outputs the next step makes
            made = engine.outputs.pending
            pending = {q.request_id for q in made[0].seqs} if made else set()
            assert in_flight <= set(engine.requests) <= in_flight | pending
            assert set(engine.sampler._seeded) <= set(engine.requests)
            assert set(engine.sampler.history) <= set(engine.requests)
            assert set(engine.guided._matchers) <= set(engine.requests)
            assert set(engine.allocator._hashes) <= {q.request_id for q in s.running}
            assert engine.allocator.num_used_blocks <= sum(len(q.block_table) for q in s.running)

        def teardown(self):
            engine = self.engine
            for _ in range(2000):
                if not engine.has_unfinished:
                    break
                engine.step()
            assert not engine.has_unfinished and not engine.requests
            assert engine.allocator.num_used_blocks == 0
            assert not engine.slots.pins
            assert not engine.sampler._seeded and not engine.guided._matchers
            assert not set(engine.sampler.history)

    EngineStates.TestCase.settings = settings(
        max_examples=30,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    EngineStates.TestCase().runTest()

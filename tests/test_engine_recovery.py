"""What the engine does when a step fails, an adapter's folder changes under it, or a request
id comes back: it goes on serving, and never serves one adapter's weights as another's."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from registry.errors import AdapterError, UsageError
from serve import LLM, SamplingParams
from tests.helpers import make_adapter, tiny_engine_args

PROMPT = [1, 5, 6, 7, 8, 9, 10, 11]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def _one_slot_llm(tiny_base) -> LLM:
    """One device slot and one host copy: each adapter change is a slot load and a re-read."""
    args = tiny_engine_args(tiny_base, max_loras=1, max_cpu_loras=1, enable_prefix_caching=False)
    return LLM(**args)


@pytest.fixture
def two(tiny_base, tmp_path):
    """Folders of adapters a and b, and an engine of one slot with a loaded."""
    a = make_adapter(tiny_base, tmp_path / "a", name="a", seed=0, rank=8, targets=TARGETS)
    b = make_adapter(tiny_base, tmp_path / "b", name="b", seed=1, rank=8, targets=TARGETS)
    llm = _one_slot_llm(tiny_base)
    llm.load_adapter("a", str(a))
    return llm, a, b


def _tokens(llm: LLM, adapter: str | None) -> list[int]:
    return llm.generate([PROMPT], GREEDY, adapters=[adapter])[0].token_ids


def test_a_failed_slot_load_leaves_no_slot_claiming_the_adapter(two, tmp_path):
    llm, a, b = two
    alone = _tokens(llm, "a")
    llm.load_adapter("b", str(b))  # a's host copy leaves: its next slot load reads the folder
    of_b = _tokens(llm, "b")
    assert of_b != alone
    os.rename(a, tmp_path / "away")
    with pytest.raises(AdapterError):
        _tokens(llm, "a")  # the step fails in its copy into the slot b fills
    assert not llm.engine.has_unfinished  # the failed generate left nothing to fail the next
    os.rename(tmp_path / "away", a)  # the same files, the same stamp: the same adapter
    assert _tokens(llm, "a") == alone  # copied in again, not b's weights under a's name
    assert _tokens(llm, "b") == of_b


def test_a_folder_rewritten_since_loading_is_refused_until_loaded_again(two, tiny_base):
    llm, a, b = two
    before = _tokens(llm, "a")
    make_adapter(tiny_base, a, name="a", seed=2, rank=8, targets=TARGETS)  # new weights
    assert _tokens(llm, "a") == before  # the slot holds a as it was read
    llm.load_adapter("b", str(b))  # a leaves the host tier
    of_b = _tokens(llm, "b")  # and its slot
    with pytest.raises(AdapterError, match="changed on disk since it was loaded; load it again"):
        _tokens(llm, "a")
    assert _tokens(llm, "b") == of_b  # the others keep serving
    uid = llm.engine.adapters["a"].uid
    llm.load_adapter("a", str(a))
    assert llm.engine.adapters["a"].uid != uid  # another version: its own slot and prefix cache
    fresh = _one_slot_llm(tiny_base)
    fresh.load_adapter("a", str(a))
    assert _tokens(llm, "a") == _tokens(fresh, "a") != before


def test_reloading_a_folder_whose_config_changed_loads_the_new_scale(tiny_base, tmp_path):
    a = make_adapter(tiny_base, tmp_path / "a", name="a", seed=0, rank=8, targets=TARGETS)
    llm = LLM(**tiny_engine_args(tiny_base))
    llm.load_adapter("a", str(a))
    before, uid = _tokens(llm, "a"), llm.engine.adapters["a"].uid
    config = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0.001}))
    llm.load_adapter("a", str(a))
    assert llm.engine.adapters["a"].uid != uid
    assert _tokens(llm, "a") == _tokens(llm, None) != before  # alpha 0.001: nearly the base


def test_a_folder_rewritten_with_the_same_file_sizes_and_times_is_another_adapter(
    tiny_base, tmp_path
):
    """Another adapter of the same shape has files of the same sizes, and a copy that keeps
    file times (cp -p, rsync -a, an archive) gives them the same times: reloading the folder
    serves the new weights, never the old ones from the slot or the old prefix cache."""
    old = make_adapter(tiny_base, tmp_path / "old", name="x", seed=0, rank=8, targets=TARGETS)
    new = make_adapter(tiny_base, tmp_path / "new", name="x", seed=1, rank=8, targets=TARGETS)
    folder = tmp_path / "x"

    def put(source):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
        for file in folder.iterdir():
            os.utime(file, ns=(10**18, 10**18))  # as an archive with normalized times has them

    llm = LLM(**tiny_engine_args(tiny_base, max_loras=1))
    put(old)
    uid = llm.load_adapter("x", str(folder)).uid
    of_old = _tokens(llm, "x")
    put(new)
    assert llm.load_adapter("x", str(folder)).uid != uid
    reloaded = _tokens(llm, "x")
    llm.load_adapter("new", str(new))
    assert reloaded == _tokens(llm, "new") != of_old
    assert _tokens(llm, "x") == reloaded  # read into the slot again, past the prefix cache


def test_a_step_that_fails_fails_its_generate_and_the_next_one_serves(tiny_base, monkeypatch):
    llm = LLM(**tiny_engine_args(tiny_base))
    expected = _tokens(llm, None)
    runner = llm.engine.runner
    sample = runner.sample

    def fail_once(*args):
        monkeypatch.setattr(runner, "sample", sample)
        raise RuntimeError("the device went away")

    monkeypatch.setattr(runner, "sample", fail_once)
    with pytest.raises(RuntimeError, match="the device went away"):
        llm.generate([PROMPT, PROMPT[:4]], GREEDY)
    engine = llm.engine
    assert not engine.has_unfinished and not engine.requests
    assert engine.allocator.num_used_blocks == 0
    assert _tokens(llm, None) == expected


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_a_request_id_reused_after_an_abort_gets_its_own_outputs(tiny_base, overlap):
    llm = LLM(**tiny_engine_args(tiny_base, overlap_outputs=overlap))
    engine = llm.engine
    second = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    [alone] = llm.generate([[1, 9, 10, 11]], second)
    engine.add_request(PROMPT, SamplingParams(max_tokens=20, temperature=0), request_id="x")
    for _ in range(3):
        engine.step()
    assert engine.abort("x")
    engine.add_request([1, 9, 10, 11], second, request_id="x")
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    [last] = [o for o in outputs if o.finished]
    assert last.token_ids == alone.token_ids and last.finish_reason == "length"
    assert [t for o in outputs for t in o.delta_token_ids] == alone.token_ids  # none of the first
    assert not engine.requests


def test_python_api_values_that_would_fail_a_step_are_refused_up_front(tiny_base):
    llm = LLM(**tiny_engine_args(tiny_base))
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="seed must be an integer"):
        SamplingParams(seed=1.5)
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        SamplingParams(max_tokens=2.5)
    with pytest.raises(ValueError, match="stop must not hold an empty string"):
        SamplingParams(stop=["", "zzz"])
    with pytest.raises(UsageError, match="prompt token ids must be integers"):
        llm.generate([[5, 6, 7.0]])
    assert not llm.engine.has_unfinished
    import numpy as np

    assert len(llm.generate([np.array(PROMPT)], GREEDY)[0].token_ids) == 8  # numpy ints do


def test_generated_ids_skip_ids_a_caller_took(tiny_base):
    engine = LLM(**tiny_engine_args(tiny_base)).engine
    engine.add_request(PROMPT, request_id="req-0")
    engine.add_request(PROMPT, request_id="req-1")
    assert engine.add_request(PROMPT) == "req-2"


def test_a_stop_string_in_the_last_allowed_token_is_why_it_stopped(tiny_base):
    llm = LLM(**tiny_engine_args(tiny_base))
    [word] = llm.tokenizer.encode(" the", add_special_tokens=False)

    def run(max_tokens: int) -> tuple[str, str, int]:
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            logit_bias={str(word): 100},  # " the" each step
            stop=[" the the the"],
        )
        [out] = llm.generate([PROMPT], params)
        return out.text, out.finish_reason, len(out.token_ids)

    assert run(3) == ("", "stop", 3)  # the stop string completes in the last token allowed
    assert run(4) == ("", "stop", 3)
    assert run(2) == (" the the", "length", 2)


def test_a_pinned_adapter_version_serves_after_its_name_moved_on(tiny_base, tmp_path):
    """What a reply's later choices ask for: the version its first choice started on, while a
    request still holds it. Then it leaves the pool: a server loading new versions for weeks
    kept a record of every one."""
    from registry.errors import NotFoundError

    first = make_adapter(tiny_base, tmp_path / "v1", name="a", seed=0, targets=TARGETS)
    second = make_adapter(tiny_base, tmp_path / "v2", name="a", seed=3, targets=TARGETS)
    llm = LLM(**tiny_engine_args(tiny_base))
    engine = llm.engine
    llm.load_adapter("a", str(first))
    pinned, of_first = engine.adapters["a"].uid, _tokens(llm, "a")

    def run(*request_ids: str) -> list[list[int]]:
        outputs = []
        while engine.has_unfinished:
            outputs += engine.step()
        return [
            next(o.token_ids for o in outputs if o.request_id == r and o.finished)
            for r in request_ids
        ]

    first_choice = engine.add_request(PROMPT, GREEDY, adapter="a")
    llm.load_adapter("a", str(second))  # while the first choice waits
    later_choice = engine.add_request(PROMPT, GREEDY, adapter="a", adapter_uid=pinned)
    assert run(first_choice, later_choice) == [of_first, of_first]
    assert _tokens(llm, "a") != of_first
    engine.unload_adapter("a")  # the pool drops what no name serves and no request holds
    assert engine.pool.origin == {} and not engine.pool.host
    with pytest.raises(NotFoundError, match="adapter 'a' is not loaded"):
        engine.add_request(PROMPT, GREEDY, adapter="a", adapter_uid=pinned)


def test_an_adapter_that_cannot_be_read_back_fails_only_its_own_requests(two, tmp_path):
    """Evicted from the host tier, then its folder gone: the step runs the other requests."""
    llm, a, b = two
    engine = llm.engine
    of_a, of_base = _tokens(llm, "a"), _tokens(llm, None)
    llm.load_adapter("b", str(b))  # a leaves the host tier
    of_b = _tokens(llm, "b")
    os.rename(a, tmp_path / "away")
    long = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = [engine.add_request(PROMPT, long, adapter) for adapter in ("b", None)]
    engine.step()  # both running, b in its slot
    failing = [engine.add_request(PROMPT, long, "a") for _ in range(2)]
    outputs = {}
    while engine.has_unfinished:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for rid in failing:
        [out] = outputs[rid]
        assert (out.finish_reason, out.token_ids) == ("error", [])
        assert "could not be read again" in str(out.error)
    assert [outputs[rid][-1].token_ids for rid in ids] == [of_b, of_base]
    assert all(out.error is None for rid in ids for out in outputs[rid])
    assert engine.allocator.num_used_blocks == 0 and not engine.slots.pins
    with pytest.raises(AdapterError, match="could not be read again"):
        _tokens(llm, "a")  # the Python API raises it
    os.rename(tmp_path / "away", a)
    assert _tokens(llm, "a") == of_a


def test_a_read_back_failing_with_any_error_fails_its_requests_and_leaves_no_slot_claimed(
    two, monkeypatch
):
    """Not only the reader's own refusals and the disk's errors: whatever a read-back raises
    (a bug) ends that adapter's requests with it, and its slot is not left claiming weights it never
    got (the next request of it would get the slot's previous adapter's)."""
    import serve.adapter_pool

    llm, a, b = two
    engine = llm.engine
    of_a = _tokens(llm, "a")
    llm.load_adapter("b", str(b))  # a leaves the host tier and b takes the slot
    of_b = _tokens(llm, "b")
    read = serve.adapter_pool.read_peft_lora

    def broken(path, *args, **kwargs):
        if path == a:
            raise RuntimeError("a bug in the reader")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(serve.adapter_pool, "read_peft_lora", broken)
    rid = engine.add_request(PROMPT, GREEDY, None)
    failing = engine.add_request(PROMPT, GREEDY, "a")
    outputs = {}
    while engine.has_unfinished:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    [out] = outputs[failing]
    assert out.finish_reason == "error" and "cannot read it back" in str(out.error)
    assert "a bug in the reader" in str(out.error) and "'a#" in str(out.error)
    assert outputs[rid][-1].error is None and len(outputs[rid][-1].token_ids) == 8
    monkeypatch.undo()
    assert _tokens(llm, "a") == of_a  # read and copied in now, not b's weights under its name
    assert _tokens(llm, "b") == of_b


def test_an_async_stream_of_an_unreadable_adapter_fails_while_the_others_finish(two, tmp_path):
    import asyncio

    from serve.async_engine import AsyncLLM, EngineStepError

    llm, a, b = two
    of_base = _tokens(llm, None)
    llm.load_adapter("b", str(b))  # a leaves the host tier
    os.rename(a, tmp_path / "away")
    engine = AsyncLLM(llm.engine)

    async def last(adapter):
        async for out in engine.generate(PROMPT, GREEDY, adapter):
            final = out
        return final.token_ids

    async def both():
        return await asyncio.gather(last(None), last("a"), return_exceptions=True)

    try:
        base, failed = asyncio.run(both())
    finally:
        engine.shutdown()
    assert base == of_base
    assert isinstance(failed, EngineStepError) and "could not be read again" in str(failed)


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny_base):
    llm = LLM(**tiny_engine_args(tiny_base))
    tiny = SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True)
    assert llm.generate([PROMPT], tiny)[0].token_ids == _tokens(llm, None)


def test_generate_ignores_requests_another_caller_queued_on_its_engine(tiny_base):
    llm = LLM(**tiny_engine_args(tiny_base))
    engine = llm.engine
    others = [engine.add_request(PROMPT, SamplingParams(max_tokens=1)) for _ in range(3)]
    engine.step()
    [out] = llm.generate([PROMPT], GREEDY)
    assert out.token_ids == _tokens(llm, None)
    assert not any(engine.requests.get(rid) for rid in others)  # they ran, and finished


async def _drain(stream) -> list:
    return [out async for out in stream]


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_a_request_whose_last_output_fails_gets_the_error_not_silence(
    tiny_base, overlap, monkeypatch
):
    import asyncio

    from serve import outputs
    from serve.async_engine import AsyncLLM, EngineStepError

    llm = LLM(**tiny_engine_args(tiny_base, overlap_outputs=overlap))
    made = outputs.RequestState.output

    def fails_on_the_last(self):  # a bug making the output that ends a request
        if self.seq.is_finished:
            monkeypatch.setattr(outputs.RequestState, "output", made)
            raise RuntimeError("no final output")
        return made(self)

    monkeypatch.setattr(outputs.RequestState, "output", fails_on_the_last)
    engine = AsyncLLM(llm.engine)

    async def run():
        # Its sequence had left the running list when the step failed: it waited forever.
        with pytest.raises(EngineStepError, match="no final output"):
            await asyncio.wait_for(_drain(engine.generate(PROMPT, GREEDY, request_id="a")), 30)
        return await _drain(engine.generate(PROMPT, GREEDY))

    try:
        served = asyncio.run(run())
    finally:
        engine.shutdown()
    assert served[-1].token_ids == _tokens(llm, None)
    assert not llm.engine.requests and llm.engine.allocator.num_used_blocks == 0


def test_a_stream_left_after_its_request_finished_aborts_no_later_request_of_its_id(tiny_base):
    import asyncio

    from serve.async_engine import AsyncLLM

    llm = LLM(**tiny_engine_args(tiny_base))
    engine = AsyncLLM(llm.engine)

    async def run():
        async for _ in engine.generate(PROMPT, GREEDY, request_id="x"):
            while "x" in llm.engine.requests:  # it finishes while its caller looks away
                await asyncio.sleep(0.01)
            break  # the stream is closed later, by the garbage collector
        # That close aborted "x" by id: the new "x", whose stream it dropped too.
        again = engine.generate([1, 9, 10, 11], GREEDY, request_id="x")
        return await asyncio.wait_for(_drain(again), 30)

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert len(outs[-1].token_ids) == GREEDY.max_tokens and llm.engine.num_aborted == 0


def test_shutdown_fails_open_streams_and_every_later_call(tiny_base):
    import asyncio

    from serve.async_engine import AsyncLLM, EngineStopped

    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base)).engine)
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def run():
        stream = engine.generate(PROMPT, long)
        await anext(stream)
        engine.shutdown()
        for call in (_drain(stream), _drain(engine.generate(PROMPT, GREEDY)), engine.abort("x")):
            with pytest.raises(EngineStopped, match="shut down"):
                await asyncio.wait_for(call, 10)  # each waited forever

    asyncio.run(run())
    assert not engine.alive


def test_an_abort_by_another_caller_ends_the_stream_with_what_it_generated(tiny_base):
    import asyncio

    from serve.async_engine import AsyncLLM

    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base)).engine)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def run():
        outs = []
        async for out in engine.generate(PROMPT, long, request_id="x"):
            outs.append(out)
            if len(outs) == 3:
                assert await engine.abort("x")  # from elsewhere: an admin, a timeout
        assert not await engine.abort("x")
        return outs

    try:
        outs = asyncio.run(asyncio.wait_for(run(), 60))  # the stream waited forever
    finally:
        engine.shutdown()
    last = outs[-1]
    assert (last.finished, last.finish_reason) == (True, "abort")
    assert last.token_ids == [t for out in outs for t in out.delta_token_ids]
    assert 3 <= len(last.token_ids) < 200 and not engine.engine.requests


def test_a_caller_whose_event_loop_closed_fails_no_other_request(tiny_base):
    """Its next output cannot be handed over (the loop is closed): that must not fail the
    step, and so every other caller's request, nor stop the engine thread."""
    import asyncio
    import threading

    from serve.async_engine import AsyncLLM

    engine = AsyncLLM(LLM(**tiny_engine_args(tiny_base)).engine)
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    healthy = {}

    async def other_caller():
        async for out in engine.generate(PROMPT, long, request_id="healthy"):
            healthy["last"] = out

    thread = threading.Thread(target=lambda: asyncio.run(other_caller()))
    thread.start()
    try:
        loop = asyncio.new_event_loop()
        stream = engine.generate([1, 9, 10, 11], long, request_id="gone")
        loop.run_until_complete(anext(stream))
        loop.close()  # the stream left open: its request runs on, for a loop that is gone
        thread.join(timeout=60)
        assert healthy["last"].finish_reason == "length" and len(healthy["last"].token_ids) == 60
        assert engine.alive
        again = asyncio.run(asyncio.wait_for(_drain(engine.generate(PROMPT, GREEDY)), 30))
        assert len(again[-1].token_ids) == GREEDY.max_tokens
        assert "gone" not in engine.engine.requests  # aborted, not left to run on
    finally:
        engine.shutdown()
    del stream


def test_an_abort_after_the_request_finished_leaves_it_its_last_output(tiny_base):
    """Overlapped, a request finishes a step before its last output is made: aborting it
    then is too late (None), and its last output still comes, not counted as aborted."""
    engine = LLM(**tiny_engine_args(tiny_base, overlap_outputs=True)).engine
    engine.add_request(PROMPT, GREEDY, request_id="x")
    outputs = []
    while not engine.requests["x"].seq.is_finished:
        outputs += engine.step()
    assert engine.abort("x") is None
    while engine.has_unfinished:
        outputs += engine.step()
    assert outputs[-1].finish_reason == "length" and len(outputs[-1].token_ids) == 8
    assert engine.num_aborted == 0 and not engine.requests


def test_a_version_number_registered_again_serves_its_new_weights(
    tiny_base, registry, tracking_uri, tmp_path
):
    """A registered model deleted and registered again numbers its versions from 1 anew:
    the new `faq/1` is another adapter (its slot and prefix cache entries), not a hit on the
    old one's."""
    from tests.helpers import register_folder

    folders = [
        make_adapter(tiny_base, tmp_path / name, name="faq", seed=seed, rank=4, targets=TARGETS)
        for name, seed in (("first", 0), ("second", 7))
    ]
    llm = LLM(**tiny_engine_args(tiny_base, tracking_uri=tracking_uri))
    served = []
    for folder in folders:
        assert register_folder(registry, folder, "faq") == 1
        llm.load_adapter("faq", "faq/1")
        served.append(_tokens(llm, "faq"))
        registry.client.delete_registered_model("faq")
    for folder, tokens in zip(folders, served, strict=True):
        alone = LLM(**tiny_engine_args(tiny_base))
        alone.load_adapter("x", str(folder))
        assert _tokens(alone, "x") == tokens
    assert served[0] != served[1]


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
def test_an_aborted_requests_last_output_holds_the_text_of_every_token(tiny_base, overlap):
    """Overlapped, the last step's token is sampled but not yet read: the abort's output
    reads it first, so text and logprobs cover every token."""
    engine = LLM(**tiny_engine_args(tiny_base, overlap_outputs=overlap)).engine
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, logprobs=0)
    engine.add_request(PROMPT, params, request_id="x")
    outputs = []
    for _ in range(5):
        outputs += engine.step()
    final = engine.abort("x")
    assert final.finish_reason == "abort" and len(final.token_ids) == 5
    assert len(final.logprobs) == 5
    assert final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    sent = [t for out in [*outputs, final] for t in out.delta_token_ids]
    assert sent == final.token_ids
    assert "".join(out.delta_text for out in [*outputs, final]) == final.text


def test_a_request_finished_by_a_step_that_then_raised_is_released_by_generates_cleanup(
    tiny_base, monkeypatch
):
    """Its last output will never be made (the step raised): `LLM.generate` must still end
    it, or it holds its id and its state for good."""
    llm = LLM(**tiny_engine_args(tiny_base))
    engine = llm.engine
    finished = engine.guided.finished

    def interrupted(seq):  # after the step finished it (by length), before its output
        if seq.is_finished:
            raise KeyboardInterrupt
        return finished(seq)

    monkeypatch.setattr(engine.guided, "finished", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    monkeypatch.undo()
    assert not engine.requests and not engine.has_unfinished
    assert engine.allocator.num_used_blocks == 0


def test_a_request_admitted_by_a_step_that_failed_before_its_slot_copy_runs_its_own_adapter(
    two, monkeypatch
):
    """The failed step took its claim on the slot back; the request it admitted (another
    caller's, still running) decoded with what the slot held before: b's weights as a's."""
    llm, _, b = two
    of_a = _tokens(llm, "a")
    llm.load_adapter("b", str(b))
    assert _tokens(llm, "b") != of_a  # the one slot now holds b
    engine = llm.engine
    other = engine.add_request(PROMPT, GREEDY, "a")
    inputs = engine.runner._eager_inputs

    def out_of_memory_once(*args, **kwargs):  # before the step's copy into the slot
        monkeypatch.setattr(engine.runner, "_eager_inputs", inputs)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine.runner, "_eager_inputs", out_of_memory_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        llm.generate([[1, 9, 10]], GREEDY)
    finished = []
    while engine.has_unfinished:
        finished += [o for o in engine.step() if o.request_id == other and o.finished]
    assert finished[0].token_ids == of_a


def test_a_request_whose_output_always_fails_fails_alone_and_the_engine_serves_on(
    tiny_base, monkeypatch
):
    """A bug in one request's output ends that request alone: it once failed the whole step
    (and, raised again by the step's recovery, the engine thread)."""
    import asyncio

    from serve import outputs
    from serve.async_engine import AsyncLLM, EngineStepError

    llm = LLM(**tiny_engine_args(tiny_base))
    made = outputs.RequestState.output

    def fails_for_bad(self):  # a bug in one request's last output
        if self.seq.request_id == "bad" and self.seq.is_finished:
            raise RuntimeError("no output for bad")
        return made(self)

    monkeypatch.setattr(outputs.RequestState, "output", fails_for_bad)
    engine = AsyncLLM(llm.engine)
    longer = dataclasses.replace(GREEDY, max_tokens=40)

    async def run():
        bad = _drain(engine.generate(PROMPT, GREEDY, request_id="bad"))
        good = _drain(engine.generate(PROMPT, longer, request_id="good"))
        results = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 60)
        return results, await asyncio.wait_for(_drain(engine.generate(PROMPT, GREEDY)), 60)

    try:
        (bad, good), later = asyncio.run(run())
        assert engine.alive
    finally:
        engine.shutdown()
    assert isinstance(bad, EngineStepError) and "no output for bad" in str(bad)
    assert good[-1].finish_reason == "length" and len(good[-1].token_ids) == 40
    assert later[-1].token_ids == _tokens(llm, None)
    assert not llm.engine.requests and llm.engine.allocator.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])
@pytest.mark.parametrize("where", ["update", "output"])
def test_a_request_whose_output_fails_ends_with_the_error_and_the_others_finish_as_alone(
    tiny_base, monkeypatch, overlap, where
):
    """Detokenizing (update) or making the output of one request raises mid-generation: it
    ends with finish reason "error" and what it had emitted; the others' tokens are those
    they get alone, and nothing of it is left in the engine."""
    from serve import outputs

    llm = LLM(**tiny_engine_args(tiny_base, overlap_outputs=overlap))
    engine = llm.engine
    longer = dataclasses.replace(GREEDY, max_tokens=12, logprobs=0)
    alone = llm.generate([PROMPT, PROMPT[:5]], longer)
    original = getattr(outputs.RequestState, where)

    def fails_for_bad(self, *args):
        if self.seq.request_id == "bad" and self.seq.num_output_tokens == 4:
            raise RuntimeError("a bug for bad")
        return original(self, *args)

    monkeypatch.setattr(outputs.RequestState, where, fails_for_bad)
    engine.add_request(PROMPT, longer, request_id="good")
    engine.add_request(PROMPT[:4], longer, request_id="bad")
    engine.add_request(PROMPT[:5], longer, request_id="later")
    made = {}
    while engine.has_unfinished:
        for out in engine.step():
            made.setdefault(out.request_id, []).append(out)
    [bad] = [out for out in made["bad"] if out.finished]
    assert bad is made["bad"][-1] and bad.finish_reason == "error"
    assert isinstance(bad.error, RuntimeError) and str(bad.error) == "a bug for bad"
    sent = [t for out in made["bad"] for t in out.delta_token_ids]
    assert bad.token_ids == sent and len(sent) == len(bad.logprobs) == 3
    assert bad.text == "".join(out.delta_text for out in made["bad"])
    assert [made[rid][-1].token_ids for rid in ("good", "later")] == [a.token_ids for a in alone]
    assert all(out.error is None for rid in ("good", "later") for out in made[rid])
    assert not engine.requests and engine.allocator.num_used_blocks == 0
    assert not engine.scheduler.running


def test_an_abort_whose_catching_up_fails_still_releases_the_request(tiny_base, monkeypatch):
    """Overlapped, an abort reads the pending step's token first; where that raises (a bug),
    the caller gets the error and the request is released all the same."""
    from serve import outputs

    engine = LLM(**tiny_engine_args(tiny_base, overlap_outputs=True)).engine
    engine.add_request(PROMPT, dataclasses.replace(GREEDY, max_tokens=30), request_id="x")
    for _ in range(3):
        engine.step()

    def fails(self, *args):
        raise RuntimeError("no catching up")

    monkeypatch.setattr(outputs.RequestState, "update", fails)
    with pytest.raises(RuntimeError, match="no catching up"):
        engine.abort("x")
    monkeypatch.undo()
    assert not engine.requests and engine.allocator.num_used_blocks == 0
    assert engine.step() == [] and not engine.has_unfinished and engine.num_aborted == 1


def _abort_output_fails(monkeypatch, request_id: str) -> None:
    """A bug in the last output of `request_id`'s abort (and no other output)."""
    from serve import outputs
    from serve.sequence import Status

    made = outputs.RequestState.output

    def fails(self):
        if self.seq.request_id == request_id and self.seq.status is Status.FINISHED_ABORTED:
            raise RuntimeError(f"no abort output for {request_id}")
        return made(self)

    monkeypatch.setattr(outputs.RequestState, "output", fails)


def test_an_abort_that_fails_still_ends_its_stream(tiny_base, monkeypatch):
    """The abort's caller gets the bug; the request's own consumer its RequestFailed, where it
    waited for an output that would never come."""
    import asyncio

    from serve.async_engine import AsyncLLM, RequestFailed

    llm = LLM(**tiny_engine_args(tiny_base))
    engine = AsyncLLM(llm.engine)
    _abort_output_fails(monkeypatch, "x")

    async def run():
        longer = dataclasses.replace(GREEDY, max_tokens=100)
        stream = engine.generate(PROMPT, longer, request_id="x")
        first = await anext(stream)
        with pytest.raises(RuntimeError, match="no abort output for x"):
            await engine.abort("x")
        with pytest.raises(RequestFailed, match="no abort output for x"):
            await asyncio.wait_for(_drain(stream), 30)
        return first, await asyncio.wait_for(_drain(engine.generate(PROMPT, GREEDY)), 30)

    try:
        first, later = asyncio.run(run())
    finally:
        engine.shutdown()
    assert not first.finished and later[-1].token_ids == _tokens(llm, None)
    assert not llm.engine.requests and llm.engine.allocator.num_used_blocks == 0


def test_generate_releases_every_request_when_one_abort_of_its_cleanup_fails(
    tiny_base, monkeypatch
):
    """A failed step: generate aborts its requests; the first abort's bug stopped the loop,
    leaving the others running (and the step's error behind the abort's)."""
    llm = LLM(**tiny_engine_args(tiny_base))
    engine, runner = llm.engine, llm.engine.runner
    sample = runner.sample
    calls = []

    def fails_the_second_step(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the device went away")
        return sample(*args)

    monkeypatch.setattr(runner, "sample", fails_the_second_step)
    _abort_output_fails(monkeypatch, "req-0")
    with pytest.raises(RuntimeError, match="the device went away"):
        llm.generate([PROMPT, PROMPT[:4], PROMPT[:5]], dataclasses.replace(GREEDY, max_tokens=20))
    monkeypatch.undo()
    assert not engine.requests and not engine.has_unfinished
    assert engine.allocator.num_used_blocks == 0
    assert _tokens(llm, None) == _tokens(LLM(**tiny_engine_args(tiny_base)), None)

"""Engine behaviour on a tiny random Llama: logprobs, sampling, stops, errors, async streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from registry.errors import AdapterError, BaseMismatchError, NotFoundError, UsageError
from serve import LLM, AsyncLLM, SamplingParams
from serve.llama import LORA_MODULES
from tests.helpers import make_lora, tiny_engine_args

PROMPTS = [[1, 50, 60, 70, 80, 90], [1, 5, 6, 7], [1, 300, 301, 302, 303, 304, 305, 306, 307]]


@pytest.fixture(scope="module")
def llm(tiny_base):
    return LLM(**tiny_engine_args(tiny_base, num_kv_blocks=64))


@pytest.fixture(scope="module")
def hf_model(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32).eval()


def test_prompt_and_token_logprobs_equal_transformers(llm, hf_model):
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=3, prompt_logprobs=2)
    [out] = llm.generate([PROMPTS[2]], params)
    with torch.no_grad():
        expected = hf_model(torch.tensor([PROMPTS[2]])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for position, lp in enumerate(out.prompt_logprobs[1:], start=1):
        token = PROMPTS[2][position]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(expected[position - 1, token]), abs=1e-4)
        assert [t for t, _ in lp.top] == expected[position - 1].topk(2).indices.tolist()
    [chosen] = out.logprobs
    assert chosen.token_id == int(expected[-1].argmax()) == out.token_ids[0]
    assert chosen.logprob == pytest.approx(float(expected[-1].max()), abs=1e-4)
    assert len(chosen.top) == 3


@pytest.mark.parametrize(
    "options",
    [{}, {"top_p": 0.9}, {"top_k": 40, "top_p": 0.5, "temperature": 0.7}],
    ids=["full", "nucleus", "top-k-and-p"],
)
def test_a_seeds_draws_do_not_depend_on_the_rest_of_the_batch(llm, options):
    """The tiny model's flat distributions put a top-p nucleus past the sampler's candidates:
    the whole-vocabulary path must give the seeded request the same tokens as well. (Its
    logits may differ in the last bits with the batch's size, which at a near-tie can change
    a token: these prompts have none.)"""
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    seeded = dataclasses.replace(seeded, **options)
    [alone] = llm.generate([PROMPTS[0]], seeded)
    batch = llm.generate(
        PROMPTS,
        [
            seeded,
            SamplingParams(max_tokens=5, temperature=1.0),
            SamplingParams(max_tokens=9, temperature=0.5, top_k=5),
        ],
    )
    assert batch[0].token_ids == alone.token_ids
    other = dataclasses.replace(seeded, seed=8)
    assert llm.generate([PROMPTS[0]], other)[0].token_ids != alone.token_ids


def test_seeds_that_differ_only_in_their_high_bits_draw_differently(llm):
    """torch's CPU generator keeps a seed's low 32 bits: 7 + 2**32 drew as 7 did."""
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    seeds = [7, 7 + 2**32, 7 + 2**40, 7 - 2**32, 2**64 - 1]
    outs = llm.generate(
        [PROMPTS[0]] * len(seeds), [dataclasses.replace(params, seed=s) for s in seeds]
    )
    tokens = {tuple(out.token_ids) for out in outs}
    assert len(tokens) == len(seeds)
    again = llm.generate([PROMPTS[0]], dataclasses.replace(params, seed=7 + 2**40))
    assert again[0].token_ids == outs[2].token_ids


def test_stop_strings_and_stop_tokens_end_the_output(llm):
    def run(**options):
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, **options)
        return llm.generate([PROMPTS[1]], params)[0]

    full = run()
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[6:10]
    cut = full.text.find(stop)
    stopped = run(stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    kept = run(stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full.text[: cut + len(stop)]
    token = full.token_ids[3]
    first = full.token_ids.index(token)
    by_token = run(stop_token_ids=[token])
    assert by_token.token_ids == full.token_ids[: first + 1]
    assert by_token.finish_reason == "stop"
    # the stop token's text is left out unless asked for, as a stop string's (vLLM's too)
    decode = llm.engine.tokenizer.decode
    assert by_token.text == decode(full.token_ids[:first], skip_special_tokens=True)
    with_it = run(stop_token_ids=[token], include_stop_str_in_output=True)
    assert with_it.text == decode(full.token_ids[: first + 1], skip_special_tokens=True)


def test_outputs_made_during_the_next_forward_pass_equal_the_step_by_step_ones(tiny_base):
    """overlap_outputs (on by default on CUDA) makes a step's outputs during the next step: a
    stop string then ends its sequence a step late, and the token computed meanwhile must not
    show. Every field of every output, streamed and final, matches the plain engine's, and a
    server's `deliver` gets them before the next step samples."""
    engines = {  # a fresh engine per run: no run finds another's prefixes cached
        mode: LLM(**tiny_engine_args(tiny_base, num_kv_blocks=64, overlap_outputs=mode != "plain"))
        for mode in ("plain", "overlap", "deliver")
    }
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    [full] = LLM(**tiny_engine_args(tiny_base, num_kv_blocks=64)).generate([PROMPTS[1]], free)
    params = [
        dataclasses.replace(free, stop=[full.text[5:9]]),
        dataclasses.replace(free, stop=[full.text[5:9]], include_stop_str_in_output=True),
        dataclasses.replace(free, stop_token_ids=[full.token_ids[4]]),
        dataclasses.replace(free, max_tokens=1, logprobs=2, prompt_logprobs=1),
        SamplingParams(max_tokens=12, temperature=0.9, seed=3, logprobs=1),
        SamplingParams(max_tokens=12, response_format={"type": "json_object"}),
        free,
    ]
    prompts = [PROMPTS[1], PROMPTS[1], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    timing = {"arrival_time", "first_token_time", "finished_time", "request_id"}

    def run(engine, deliver=False):
        ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
        streams = {request_id: [] for request_id in ids}
        events = []  # with `deliver`: outputs and samplings, in order

        def take(outputs):
            events.append("outputs")
            for out in outputs:
                fields = dataclasses.asdict(out)
                streams[out.request_id].append({k: fields[k] for k in fields.keys() - timing})

        sample = engine.runner.sample
        engine.runner.sample = lambda *a: events.append("sample") or sample(*a)
        while engine.has_unfinished:
            if deliver:
                assert engine.step(deliver=take) == []
            else:
                take(engine.step())
        del engine.runner.sample
        assert not engine.requests and engine.allocator.num_used_blocks == 0
        return [streams[request_id] for request_id in ids], events

    plain, _ = run(engines["plain"].engine)
    overlapped, _ = run(engines["overlap"].engine)
    delivered, events = run(engines["deliver"].engine, deliver=True)
    assert delivered == overlapped
    # delivered as soon as made: each step's outputs before the next step samples
    assert events[:5] == ["sample", "outputs", "sample", "outputs", "sample"]
    assert [s[-1]["finish_reason"] for s in plain] == [
        *["stop"] * 3,
        *["length"] * 2,
        "stop",
        "length",
    ]
    # A stopped sequence's extra step changes the batch: logprobs may move in the last bits
    # (CPU matmuls block by batch size); tokens, texts and every other field may not.
    assert _floats_apart(overlapped) == _floats_apart(plain)
    assert _floats(overlapped) == pytest.approx(_floats(plain), rel=1e-5)


def _floats_apart(value):
    """`value` with each float (at any depth) replaced by None."""
    if isinstance(value, float):
        return None
    if isinstance(value, dict):
        return {k: _floats_apart(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_floats_apart(v) for v in value]
    return value


def _floats(value) -> list[float]:
    """The floats in `value`, depth first."""
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [f for v in value for f in _floats(v)]
    return []


def test_logit_bias_forces_or_bans_tokens_per_request_in_one_batch(llm):
    def params(**bias):
        return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **bias)

    [alone] = llm.generate([PROMPTS[0]], params())
    plain, forced = llm.generate([PROMPTS[0]] * 2, [params(), params(logit_bias={"7": 100})])
    assert forced.token_ids == [7] * 6
    assert plain.token_ids == alone.token_ids  # the other request in the batch is untouched
    ban = {str(t): -100 for t in alone.token_ids}
    [banned] = llm.generate([PROMPTS[0]], params(logit_bias=ban))
    assert not set(banned.token_ids) & set(alone.token_ids)
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={"5": 101})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        SamplingParams(logit_bias={"five": 1})
    with pytest.raises(UsageError, match="logit_bias holds token ids outside the vocabulary"):
        llm.generate([PROMPTS[0]], SamplingParams(logit_bias={str(10**7): 1}))
    assert not llm.engine.has_unfinished


def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm):
    with pytest.raises(NotFoundError, match=r"adapter 'nope' is not loaded"):
        llm.generate([PROMPTS[0]], adapters=["nope"])
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(got -1\)"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(got inf\)"):
        SamplingParams(temperature=float("inf"))  # its logits were NaN: the last id drawn
    with pytest.raises(ValueError, match=r"repetition_penalty must be in \[0.01, 100\]"):
        SamplingParams(repetition_penalty=float("inf"))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"top_k must be in \[0, 2\*\*31\)"):
        SamplingParams(top_k=2**63)  # found by the server's fuzzing: it failed a whole step
    with pytest.raises(UsageError, match="the context length is 256"):
        llm.generate([[1] * 300])
    with pytest.raises(UsageError, match="outside the vocabulary"):
        llm.generate([[1, 10**7]])
    assert not llm.engine.has_unfinished  # nothing half-queued
    [ok] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0))
    assert len(ok.token_ids) == 3


def test_bad_adapters_are_refused_with_the_reason(llm, tiny_base, smollm2, tmp_path):
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        llm.load_adapter("x", str(tmp_path))
    big = make_lora(tiny_base, tmp_path / "big", rank=16, targets=["q_proj"])
    with pytest.raises(AdapterError, match="rank 16 is over max_lora_rank 8"):
        llm.load_adapter("big", str(big))
    foreign = make_lora(smollm2, tmp_path / "foreign", rank=4, targets=["q_proj"])
    with pytest.raises(BaseMismatchError, match="not on this base"):
        llm.load_adapter("foreign", str(foreign))
    # Trained on this base, but with another chat template (the base folder's edited since)
    other = make_lora(tiny_base, tmp_path / "other-template", rank=4, targets=["q_proj"])
    lineage = json.loads((other / "loraplex.json").read_text())
    lineage["tokenizer"]["chat_template"] = "0" * 16
    (other / "loraplex.json").write_text(json.dumps(lineage))
    with pytest.raises(BaseMismatchError, match=r"another chat template than this base's"):
        llm.load_adapter("other", str(other))
    del lineage["tokenizer"]  # a lineage written before tokenizers were recorded: not checked
    (other / "loraplex.json").write_text(json.dumps(lineage))
    assert llm.load_adapter("other", str(other)).rank == 4
    llm.unload_adapter("other")
    (foreign / "loraplex.json").unlink()  # no lineage: the shapes still give it away
    with pytest.raises(AdapterError, match=r"layer 0 q_proj has A \[4, 576\]"):
        llm.load_adapter("foreign", str(foreign))
    odd = tmp_path / "odd"
    shutil.copytree(make_lora(tiny_base, tmp_path / "lm", rank=4, targets=["q_proj"]), odd)
    from safetensors.torch import load_file, save_file

    state = load_file(str(odd / "adapter_model.safetensors"))
    state = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in state.items()}
    save_file(state, str(odd / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"unsupported target modules \['qkv_proj'\]"):
        llm.load_adapter("odd", str(odd))
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        llm.load_adapter("big", str(big))
    # A name that reads as a reference MLflow refuses (a server's key check would fail on it)
    small = make_lora(tiny_base, tmp_path / "small", rank=4, targets=["q_proj"])
    with pytest.raises(UsageError, match="alias 'v2' is reserved by MLflow"):
        llm.load_adapter("faq@v2", str(small))
    assert llm.engine.adapters == {}  # nothing half-loaded
    [ok] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))
    assert len(ok.token_ids) == 2


def test_adapter_loads_while_a_request_decodes(tiny_base, tmp_path):
    """The running request's tokens are the base's alone, the next one's the adapter's."""
    args = tiny_engine_args(tiny_base)
    engine = AsyncLLM(LLM(**args).engine)
    folder = make_lora(
        tiny_base, tmp_path / "late", rank=4, targets=["q_proj", "v_proj"], b_scale=1.0
    )
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

    async def main():
        events = []

        async def stream():
            last = None
            async for last in engine.generate(PROMPTS[2], params):  # noqa: B007
                events.append("token")
            return last.token_ids

        task = asyncio.create_task(stream())
        while not events:
            await asyncio.sleep(0.01)
        await engine.load_adapter("late", str(folder))
        events.append("loaded")
        tokens = await task
        [with_adapter] = [
            o async for o in engine.generate(PROMPTS[2], params, adapter="late") if o.finished
        ]
        return events, tokens, with_adapter

    events, tokens, with_adapter = asyncio.run(main())
    engine.shutdown()
    loaded_at = events.index("loaded")
    assert 0 < loaded_at < len(events) - 1  # loaded mid-stream, and the stream went on
    reference = LLM(**args)
    assert tokens == reference.generate([PROMPTS[2]], params)[0].token_ids
    reference.load_adapter("late", str(folder))
    [of_late] = reference.generate([PROMPTS[2]], params, adapters=["late"])
    assert with_adapter.token_ids == of_late.token_ids != tokens


@pytest.mark.parametrize("overlap", [False, True])
def test_async_engine_streams_deltas_and_abort_frees_blocks(tiny_base, overlap):
    engine = AsyncLLM(
        LLM(**tiny_engine_args(tiny_base, num_kv_blocks=32, overlap_outputs=overlap)).engine
    )

    async def main():
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        deltas, texts, last = [], [], None
        async for out in engine.generate(PROMPTS[0], params):
            deltas.append(out.delta_token_ids)
            texts.append(out.delta_text)
            last = out
        assert last.finished and [t for d in deltas for t in d] == last.token_ids
        assert "".join(texts) == last.text
        assert len(deltas) > 1  # streamed, not delivered at the end

        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        aborted = (await engine.stats_async())["requests_aborted"]
        seen = 0
        async for _ in engine.generate(PROMPTS[1], long):
            seen += 1
            if seen == 3:
                break  # the client goes away
        for _ in range(500):  # the abort runs on the engine thread
            if (await engine.stats_async())["requests_aborted"] == aborted + 1:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("leaving the stream aborted no request")
        with pytest.raises(NotFoundError):
            async for _ in engine.generate(PROMPTS[1], long, adapter="missing"):
                pass
        return engine.stats()

    stats = asyncio.run(main())
    engine.shutdown()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_used"] == 0


def test_cli_help_does_not_import_torch():
    code = "import sys, registry.app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_bfloat16_engine_scores_like_float32(tiny_base, tmp_path, quantization):
    """bf16 is the GPU default, and CI has no GPU: the same engine in bf16 on the CPU, through
    chunked prefill (later chunks read the bf16 cache), an adapter and decode, scores every
    prompt token within bf16's rounding of the float32 engine's scores."""
    folder = make_lora(tiny_base, tmp_path / "a", rank=8, targets=LORA_MODULES, b_scale=1.0)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0)
    prompts = [PROMPTS[2] * 3, PROMPTS[0]]  # 27 tokens: 4 chunks of 8
    scored = {}
    for dtype in ("float32", "bfloat16"):
        args = tiny_engine_args(
            tiny_base, dtype=dtype, quantization=quantization, max_num_batched_tokens=8
        )
        llm = LLM(**args)
        llm.load_adapter("a", str(folder))
        outs = llm.generate(prompts, params, adapters=["a", None])
        scored[dtype] = [[lp.logprob for lp in o.prompt_logprobs[1:]] for o in outs]
        tokens = [o.token_ids for o in outs]
    for ours, reference in zip(scored["bfloat16"], scored["float32"], strict=True):
        torch.testing.assert_close(ours, reference, rtol=0.02, atol=0.05)
    assert all(len(t) == 6 for t in tokens)


def test_a_cuda_device_without_one_is_a_usage_error_before_anything_loads(tmp_path):
    """A GPU config started on a CPU machine crashed in torch with a traceback (exit 1)."""
    import torch

    from registry.errors import UsageError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="device: 'cuda', but torch finds no CUDA device"):
        LLM(base_model=str(tmp_path / "not-even-a-model"), device="cuda")

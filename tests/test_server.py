"""The REST server with the stock `openai` client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import openai
import pytest

from serve import SamplingParams
from tests.helpers import hang_up_after, make_lora, tiny_server

QUESTION = [{"role": "user", "content": "What is the capital of Norway?"}]
PROMPT = "What is the capital of Norway?"


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    with tiny_server(tiny_base, tmp_path_factory.mktemp("srv")) as served:
        yield served


def test_chat_answers_equal_the_offline_engine_per_adapter(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    for model, adapter in (("tiny", None), ("faq", "faq")):
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=12, temperature=0
        )
        [expected] = reference.chat(
            QUESTION, SamplingParams(max_tokens=12, temperature=0), adapters=[adapter]
        )
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)
        assert reply.choices[0].finish_reason == expected.finish_reason
    models = {m.id for m in client.models.list().data}
    assert models == {"tiny", "faq"}


def test_streaming_chunks_add_up_to_the_answer_with_usage_at_the_end(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    chunks = list(
        client.chat.completions.create(
            model="faq",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [expected] = reference.chat(
        QUESTION, SamplingParams(max_tokens=12, temperature=0), adapters=["faq"]
    )
    assert text == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len([c for c in chunks if c.choices]) > 2  # streamed token by token


def test_async_client_and_completions_with_token_prompts(server):
    url, reference, _ = server
    prompt = [1, 300, 301, 302, 303]

    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="unused")
        return await asyncio.gather(
            *(
                client.completions.create(
                    model="faq",
                    prompt=prompt,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for _ in range(4)
            )
        )

    replies = asyncio.run(main())
    [expected] = reference.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapters=["faq"]
    )
    assert {r.choices[0].text for r in replies} == {expected.text}


def test_completions_batch_prompts_and_n_choices_in_order_whole_or_streamed(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    prompts = [[1, 300, 301], [1, 40, 41, 42]]
    args = dict(model="faq", prompt=prompts, n=2, max_tokens=5, temperature=0)
    args["extra_body"] = {"ignore_eos": True}
    reply = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    expected = reference.generate(prompts, params, adapters=["faq", "faq"])
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [e.text for e in expected for _ in range(2)]
    streamed = ["", "", "", ""]
    for chunk in chunks[:-1]:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in reply.choices]
    prompt_tokens, completion_tokens = sum(map(len, prompts)), 4 * 5  # each prompt once
    for used in (reply.usage, chunks[-1].usage):
        assert (used.prompt_tokens, used.completion_tokens) == (prompt_tokens, completion_tokens)


def test_content_parts_and_the_developer_role_read_as_text_and_system(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    question = QUESTION[0]["content"]
    as_parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief. "},
                                          {"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]  # fmt: skip
    as_strings = [
        {"role": "system", "content": "Be brief. Answer in English."},
        {"role": "user", "content": question},
    ]
    replies = [
        client.chat.completions.create(
            model="faq", messages=m, max_tokens=4, temperature=0, logprobs=True
        )
        for m in (as_parts, as_strings)
    ]
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens
    first, second = ([t.logprob for t in r.choices[0].logprobs.content] for r in replies)
    assert first == second  # the same prompt, to the bit


def test_completion_features_it_does_not_serve_are_refused_not_ignored(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="faq", prompt="a", suffix="b", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="faq", prompt="a", best_of=3, max_tokens=2)
    ok = client.completions.create(model="faq", prompt="a", best_of=2, n=2, max_tokens=2)
    assert len(ok.choices) == 2


def test_logit_bias_reaches_the_sampler(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    reply = client.completions.create(
        model="faq", prompt=[1, 300], max_tokens=4, logprobs=0, logit_bias={"7": 100}
    )
    assert reply.choices[0].logprobs.tokens == [reference.engine.tokenizer.decode([7])] * 4
    assert reply.usage.completion_tokens == 4


def test_n_sampled_choices_differ_and_a_seed_repeats_them(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    args = dict(model="tiny", messages=QUESTION, max_tokens=8, temperature=1.0, seed=7)
    args["extra_body"] = {"ignore_eos": True}
    first = [c.message.content for c in client.chat.completions.create(**args, n=3).choices]
    again = [c.message.content for c in client.chat.completions.create(**args, n=3).choices]
    alone = client.chat.completions.create(**args).choices[0].message.content
    assert first == again and len(set(first)) == 3
    assert first[0] == alone  # the first choice keeps the seed


def test_the_other_choices_of_a_prompt_reuse_its_first_choices_prefill(server):
    url, _, engine = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    prompt = [1, *range(700, 740)]  # 41 tokens: 10 full blocks of 4, seen by no other test
    before = engine.stats()
    reply = client.completions.create(model="faq", prompt=prompt, n=3, max_tokens=3, seed=1)
    after = engine.stats()
    assert len(reply.choices) == 3
    assert after["prefix_cache_hit_blocks"] - before["prefix_cache_hit_blocks"] == 2 * 10


def test_a_refused_prompt_in_a_batch_refuses_the_request_and_frees_the_rest(server):
    url, _, engine = server
    aborted = engine.stats()["requests_aborted"]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="vocabulary") as refused:  # the engine's
        client.completions.create(
            model="faq",
            prompt=[[1, 300, 301], [1, 10**7]],
            max_tokens=400,
            n=2,
            extra_body={"ignore_eos": True},
        )
    assert refused.value.body["param"] == "prompt"
    deadline = time.monotonic() + 10
    while engine.stats()["kv_blocks_used"] or engine.stats()["running"]:
        assert time.monotonic() < deadline, "the batch's other requests kept their blocks"
        time.sleep(0.05)
    # the short prompt's first choice; the second choices are queued only after the first ones
    assert engine.stats()["requests_aborted"] == aborted + 1
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.completions.create(model="faq", prompt="hi", n=17)


def test_chat_logprobs_are_the_engines_whole_or_streamed(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    args = dict(model="faq", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True)
    reply = client.chat.completions.create(**args, top_logprobs=3)
    chunks = client.chat.completions.create(**args, top_logprobs=3, stream=True)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    [expected] = reference.chat(
        QUESTION, SamplingParams(max_tokens=6, temperature=0, logprobs=3), adapters=["faq"]
    )
    tokenizer = reference.engine.tokenizer
    content = reply.choices[0].logprobs.content
    assert len(content) == len(expected.logprobs) == len(streamed)
    for got, seen, lp in zip(content, streamed, expected.logprobs, strict=True):
        assert got.token == seen.token == tokenizer.decode([lp.token_id])
        assert got.bytes == seen.bytes and bytes(got.bytes).decode() == got.token  # ASCII here
        assert got.logprob == seen.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [tokenizer.decode([t]) for t, _ in lp.top]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [v for _, v in lp.top], abs=1e-5
        )
    plain = client.chat.completions.create(**{**args, "logprobs": False})
    assert plain.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_as_the_engine_does(server):
    """What lm-eval-harness and the like send to score text: echo with logprobs."""
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    prompt = [1, 300, 301, 302, 303, 304]
    args = dict(model="faq", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    reply = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2)
    [expected] = reference.generate([prompt], params, adapters=["faq"])
    tokenizer = reference.engine.tokenizer
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(prompt) + expected.text
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    scores = choice.logprobs
    ids = prompt + expected.token_ids
    assert scores.tokens == [tokenizer.decode([t]) for t in ids]
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None
    entries = expected.prompt_logprobs[1:] + expected.logprobs
    assert scores.token_logprobs[1:] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    # the token itself always among them, first (OpenAI's "up to logprobs+1 elements")
    assert [list(t) for t in scores.top_logprobs[1:]] == [
        list(dict.fromkeys(tokenizer.decode([t]) for t in [e.token_id] + [t for t, _ in e.top]))
        for e in entries
    ]
    chosen = [tokenizer.decode([e.token_id]) for e in entries]
    got = [top[token] for top, token in zip(scores.top_logprobs[1:], chosen, strict=True)]
    assert got == pytest.approx([e.logprob for e in entries], abs=1e-5)
    assert scores.text_offset == [len("".join(scores.tokens[:i])) for i in range(len(ids))]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for field in ("tokens", "text_offset", "token_logprobs"):
        joined = [v for s in streamed for v in getattr(s, field)]
        assert joined == getattr(scores, field), field

    plain = client.completions.create(**{**args, "echo": False})
    assert plain.choices[0].text == expected.text
    assert plain.choices[0].logprobs.tokens == scores.tokens[len(prompt) :]
    assert plain.choices[0].logprobs.text_offset[0] == len(tokenizer.decode(prompt))


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        (dict(model="no such model"), openai.NotFoundError, "'no such model' does not exist"),
        (dict(model="nope"), openai.NotFoundError, "'nope' does not exist"),
        (dict(model="tiny", temperature=5), openai.BadRequestError, "temperature"),
        (dict(model="tiny", max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(model="tiny", messages=[]), openai.BadRequestError, "messages"),
        (
            dict(model="tiny", messages=[{"role": "user", "content": "x " * 600}]),
            openai.BadRequestError,
            "context length",
        ),
        (dict(model="missing@champion"), openai.NotFoundError, "or a registered adapter"),
        (dict(model="tiny", top_logprobs=2), openai.BadRequestError, "top_logprobs"),
        (
            dict(model="tiny", tools=[{"type": "function", "function": {"name": "f"}}]),
            openai.BadRequestError,
            "tools: Value error, function calling is not supported",
        ),
        (dict(model="tiny", tool_choice="required"), openai.BadRequestError, "tool_choice"),
        (
            dict(model="tiny", messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            openai.BadRequestError,
            "messages.0.content",
        ),
        (dict(model="tiny", logit_bias={"5": 300}), openai.BadRequestError, "logit_bias values"),
        (dict(model="tiny", logit_bias={"9999999": 1}), openai.BadRequestError, "vocabulary"),
        (dict(model="tiny", logprobs=True, top_logprobs=21), openai.BadRequestError, "top_logp"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, kwargs, error, fragment
):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    args = {"messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**args)
    assert fragment in str(raised.value)
    ok = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    url, _, engine = server
    aborted = engine.stats()["requests_aborted"]
    client = openai.OpenAI(base_url=url, api_key="unused")
    stream = client.chat.completions.create(
        model="faq",
        messages=QUESTION,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    hang_up_after(stream, 4)
    deadline = time.monotonic() + 10
    while engine.stats()["kv_blocks_used"] or engine.stats()["running"]:
        assert time.monotonic() < deadline, "the request kept its blocks after the disconnect"
        time.sleep(0.05)
    assert engine.stats()["requests_aborted"] == aborted + 1  # aborted, not run to the end


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_adapters_load_and_unload_at_run_time_and_a_corrupt_one_is_refused(
    server, tiny_base, tmp_path
):
    url, reference, _ = server
    root = url.removesuffix("/v1")
    assert _http("GET", f"{root}/ready") == (200, {"status": "ready"})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_alpha": 8}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    status, body = _http("POST", f"{url}/adapters", {"name": "broken", "source": str(broken)})
    assert (status, body["error"]["param"]) == (400, "source")

    folder = make_lora(tiny_base, tmp_path / "late", rank=2, targets=["o_proj"], b_scale=1.0)
    status, body = _http("POST", f"{url}/adapters", {"name": "late", "source": str(folder)})
    assert status == 200 and body["rank"] == 2 and body["modules"] == ["o_proj"]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    reply = client.chat.completions.create(
        model="late", messages=QUESTION, max_tokens=8, temperature=0
    )
    reference.load_adapter("late", str(folder))
    try:
        [of_late, of_base] = reference.chat([QUESTION] * 2, greedy, adapters=["late", None])
    finally:
        reference.unload_adapter("late")
    assert reply.choices[0].message.content == of_late.text != of_base.text
    assert _http("DELETE", f"{url}/adapters/late")[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="late", messages=QUESTION, max_tokens=3)
    assert _http("DELETE", f"{url}/adapters/late")[0] == 404
    ok = client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_vllms_lora_adapter_routes_load_replace_and_unload_as_vllm_answers(
    server, tiny_base, tmp_path
):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    first, second = (
        make_lora(
            tiny_base, tmp_path / f"sql-{seed}", rank=2, targets=["o_proj"], seed=seed, b_scale=1.0
        )
        for seed in (0, 1)
    )

    def answer() -> str:
        reply = client.completions.create(model="sql", prompt=PROMPT, max_tokens=8, temperature=0)
        return reply.choices[0].text

    def offline(folder) -> str:
        reference.load_adapter("sql", str(folder))
        try:
            [out] = reference.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0), ["sql"])
        finally:
            reference.unload_adapter("sql")
        return out.text

    load = {"lora_name": "sql", "lora_path": str(first)}
    loaded = httpx.post(f"{url}/load_lora_adapter", json=load)
    assert (loaded.status_code, loaded.text) == (
        200,
        "Success: LoRA adapter 'sql' added successfully.",
    )
    assert answer() == offline(first)
    again = httpx.post(f"{url}/load_lora_adapter", json=load)
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    assert "set load_inplace" in again.json()["error"]["message"]
    replace = {"lora_name": "sql", "lora_path": str(second), "load_inplace": True}
    inplace = httpx.post(f"{url}/load_lora_adapter", json=replace)
    assert inplace.status_code == 200
    assert answer() == offline(second) != offline(first)  # the new weights serve
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "sql", "lora_int_id": 3})
    assert (gone.status_code, gone.text) == (
        200,
        "Success: LoRA adapter 'sql' removed successfully.",
    )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql", prompt="Hi", max_tokens=2)
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 404
    # as vLLM: a path with no adapter is a 404, naming the field
    missing = httpx.post(f"{url}/load_lora_adapter", json={**load, "lora_path": "./nowhere"})
    assert (missing.status_code, missing.json()["error"]["param"]) == (404, "lora_path")
    assert "'./nowhere': no such folder" in missing.json()["error"]["message"]
    base = httpx.post(f"{url}/load_lora_adapter", json={**load, "lora_name": "tiny"})
    assert base.status_code == 400 and base.json()["error"]["param"] == "lora_name"
    # two loads of one name at once: one loads it, the other is told it is loaded already
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: httpx.post(f"{url}/load_lora_adapter", json=load), [0, 1]))
    assert sorted(reply.status_code for reply in both) == [200, 400]


MISTRAL_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ message['content'] }}{% endfor %}"
)


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_them(server, monkeypatch):
    url, _, engine = server
    monkeypatch.setattr(engine.engine.tokenizer, "chat_template", MISTRAL_LIKE_TEMPLATE)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    with pytest.raises(openai.BadRequestError, match="roles must alternate") as refused:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert refused.value.body["param"] == "messages"
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)


@pytest.mark.parametrize("stream", [False, True])
def test_a_step_failing_before_the_first_token_is_an_openai_500_with_the_request_id(server, stream):
    import httpx

    url, _, engine = server
    runner = engine.engine.runner
    sample = runner.sample

    def fail_once(plan, forward):
        runner.sample = sample
        raise RuntimeError("out of memory (simulated)")

    runner.sample = fail_once
    try:
        body = {"model": "faq", "prompt": [1, 300, 301], "max_tokens": 4, "stream": stream}
        reply = httpx.post(f"{url}/completions", json=body, timeout=60)
    finally:
        runner.sample = sample
    assert reply.status_code == 500 and reply.headers["x-request-id"].startswith("req-")
    error = reply.json()["error"]
    assert error["type"] == "server_error" and "out of memory (simulated)" in error["message"]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert client.completions.create(model="faq", prompt=[1, 300], max_tokens=2)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_output_fails_is_a_500_that_shows_no_server_detail(
    server, monkeypatch, stream
):
    """It ends alone (no step failed: the message says so), and the bug's text, which may
    name the server's folders, stays in its log; streamed, after chunks, as an error event."""
    import json

    import httpx

    from serve import outputs

    url, _, _ = server
    update = outputs.RequestState.update
    prompt = [1, 300, 302, 303]

    def fails(self, *args):
        if self.seq.prompt_token_ids == prompt and self.seq.num_output_tokens == 1 + 2 * stream:
            raise RuntimeError("a bug reading /srv/secret")
        return update(self, *args)

    monkeypatch.setattr(outputs.RequestState, "update", fails)
    body = {"model": "faq", "prompt": prompt, "max_tokens": 8, "stream": stream, "ignore_eos": True}
    reply = httpx.post(f"{url}/completions", json=body, timeout=60)
    if stream:
        events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
        assert reply.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert len(events) == 4  # the two tokens' chunks, then the error
    else:
        assert reply.status_code == 500 and reply.headers["x-request-id"].startswith("req-")
        error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "request_failed")
    assert error["message"] == (
        "the engine could not serve this request: making its output failed (a bug, in the "
        "server's log)"
    )
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert client.completions.create(model="faq", prompt=[1, 300], max_tokens=2).usage


def test_what_a_client_is_told_of_each_engine_failure():
    from registry.errors import AdapterError
    from serve.async_engine import EngineStepError, RequestFailed
    from serve.error_handlers import engine_failed

    told = {
        "step": engine_failed(EngineStepError("CUDA out of memory")),
        "adapter": engine_failed(RequestFailed.caused_by(AdapterError("/srv/a: unreadable"))),
        "bug": engine_failed(RequestFailed.caused_by(KeyError("/srv/b"))),
    }
    assert {k: (r.status, r.code) for k, r in told.items()} == {
        "step": (500, "engine_step_failed"),
        "adapter": (500, "request_failed"),
        "bug": (500, "request_failed"),
    }
    assert str(told["step"]) == "the engine step computing this request failed: CUDA out of memory"
    assert str(told["adapter"]) == (
        "the engine could not serve this request: its adapter could not be read back from "
        "where it was loaded; load it again"
    )
    assert "/srv" not in str(told["bug"])


def test_an_internal_value_error_is_a_500_not_the_clients_400(server, monkeypatch):
    import httpx

    url, _, _ = server

    def broken(outputs, n):
        raise ValueError("a bug in the server")

    monkeypatch.setattr("serve.server.usage", broken)
    body = {"model": "faq", "prompt": [1, 300, 301], "max_tokens": 2}
    reply = httpx.post(f"{url}/completions", json=body, timeout=60)
    assert reply.status_code == 500 and reply.headers["x-request-id"].startswith("req-")
    assert reply.json()["error"]["type"] == "server_error"
    assert "a bug" not in reply.text  # internals stay in the server's log
    monkeypatch.undo()
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):  # the client's own: 400
        client.completions.create(model="faq", prompt="a", max_tokens=2, logit_bias={"5": 300})


def test_text_past_the_context_is_refused_before_tokenizing_and_off_both_loops(server, monkeypatch):
    import threading

    url, _, engine = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    tokenizer, llm_engine = engine.engine.tokenizer, engine.engine
    template, add_request = tokenizer.apply_chat_template, llm_engine.add_request
    seen = []

    def templating(*args, **kwargs):
        seen.append(("template", threading.current_thread().name))
        return template(*args, **kwargs)

    def adding(prompt, *args, **kwargs):
        seen.append(("prompt", type(prompt).__name__))
        return add_request(prompt, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", templating)
    monkeypatch.setattr(llm_engine, "add_request", adding)
    huge = "word " * (llm_engine.max_model_len * 16 // 5 + 1)
    chat = {"messages": [{"role": "user", "content": huge}]}
    for create, field, args in (
        (client.completions.create, "prompt", {"prompt": huge}),
        (client.chat.completions.create, "messages", chat),
    ):
        with pytest.raises(openai.BadRequestError, match="context length") as refused:
            create(model="faq", max_tokens=2, **args)
        assert refused.value.body["param"] == field
    assert seen == []  # refused before templating, tokenizing or queueing
    client.completions.create(model="faq", prompt="Hello there", max_tokens=2)
    client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=2)
    # Tokenized in a worker thread, neither the event loop's nor the engine's.
    assert seen[0] == ("prompt", "list") and seen[-1] == ("prompt", "list")
    assert seen[1][0] == "template" and seen[1][1].startswith("asyncio")


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(server):
    import socket

    import httpx

    url, _, _ = server
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port))) as client:  # says 1 GB, sends nothing
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        client.settimeout(30)
        head = b""
        while b"}}" not in head and (part := client.recv(4096)):  # head and body, perhaps apart
            head += part
    assert head.startswith(b"HTTP/1.1 413") and b'"type":"invalid_request_error"' in head

    def chunks():  # no Content-Length: counted as read
        yield b'{"model": "faq", "prompt": "'
        for _ in range(17):
            yield b"x" * 2**20

    reply = httpx.post(f"{url}/completions", content=chunks(), timeout=60)
    assert reply.status_code == 413 and "over the limit" in reply.json()["error"]["message"]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert client.completions.create(model="faq", prompt=[1, 300], max_tokens=2)


def test_vllms_tokenize_and_detokenize_give_the_ids_requests_are_fed(server):
    url, _, engine = server
    root = url.removesuffix("/v1")
    tokenizer = engine.engine.tokenizer
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

    def post(route: str, body: dict) -> httpx.Response:
        return httpx.post(f"{root}/{route}", json=body, timeout=30)

    def template(opened: bool) -> list[int]:
        text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=opened)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    chat = post("tokenize", {"model": "faq", "messages": QUESTION}).json()
    served = client.chat.completions.create(model="faq", messages=QUESTION, max_tokens=1)
    assert chat["tokens"] == template(True)
    assert chat["count"] == len(chat["tokens"]) == served.usage.prompt_tokens
    assert chat["max_model_len"] == engine.engine.max_model_len
    history = post("tokenize", {"messages": QUESTION, "add_generation_prompt": False}).json()
    assert history["tokens"] == template(False) != chat["tokens"]

    text = "Oslo is the capital of Norway."
    ids = post("tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert ids["tokens"] == tokenizer(text)["input_ids"]
    assert ids["token_strs"] == tokenizer.convert_ids_to_tokens(ids["tokens"])
    # vLLM's null defaults, and fields of other requests (a chat body sent to count it): fine
    body = {"prompt": text, "add_special_tokens": False, "return_token_strs": None}
    bare = post("tokenize", {**body, "chat_template": None, "temperature": 0.5}).json()
    assert bare["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] is None
    back = post("detokenize", {"model": "faq", "tokens": ids["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(ids["tokens"])}

    for route, body, status, param in (
        ("tokenize", {"prompt": text, "messages": QUESTION}, 400, "messages"),
        ("tokenize", {}, 400, "prompt"),
        ("tokenize", {"messages": QUESTION, "add_special_tokens": True}, 400, "add_special_tokens"),
        ("tokenize", {"prompt": text, "chat_template": "{{ x }}"}, 400, "chat_template"),
        ("tokenize", {"model": "nothing", "prompt": text}, 404, "model"),
        ("detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
        ("detokenize", {"tokens": [1] * (engine.engine.max_model_len + 1)}, 400, "tokens"),
        (
            "tokenize",
            {"messages": QUESTION, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        ("detokenize", {"model": "nothing", "tokens": [1]}, 404, "model"),
    ):
        refused = post(route, body)
        assert (refused.status_code, refused.json()["error"]["param"]) == (status, param), body

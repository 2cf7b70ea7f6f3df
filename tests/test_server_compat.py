"""What OpenAI's and vLLM's clients send beyond the basics: nulls, the context length, vLLM's
extensions, prompt scoring with `max_tokens: 0`, model retrieval and the shape of every error."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serve import SamplingParams
from tests.helpers import tiny_server

QUESTION = [{"role": "user", "content": "What is the capital of Norway?"}]
MAX_WAITING = 6


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    """(url, an offline engine with the same adapter for reference, the server's context)."""
    root = tmp_path_factory.mktemp("compat")
    with tiny_server(tiny_base, root, max_waiting=MAX_WAITING) as (url, reference, engine):
        yield url, reference, engine.engine.max_model_len


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "faq", **body}, timeout=60)


def test_null_means_the_default_for_every_nullable_field(server):
    url, _, _ = server
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "stop"]
    )
    asked = {"messages": QUESTION, "max_tokens": 6, "seed": 7}
    plain = _post(url, "/chat/completions", asked).json()
    nulled = _post(url, "/chat/completions", {**asked, **nulls, "logprobs": None}).json()
    assert nulled["choices"][0]["message"] == plain["choices"][0]["message"]
    prompt = {"prompt": "Hello", "max_tokens": 4, "seed": 7}
    text = _post(url, "/completions", prompt).json()["choices"][0]["text"]
    nulled = _post(url, "/completions", {**prompt, **nulls, "echo": None, "logprobs": None})
    assert nulled.json()["choices"][0]["text"] == text


def test_a_reply_that_cannot_fit_the_context_is_refused_not_cut(server):
    url, reference, context = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    prompt = list(range(1, context - 4))  # room for 5 tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="faq", prompt=prompt, max_tokens=6)
    assert refused.value.body["param"] == "max_tokens"
    assert refused.value.body["code"] == "context_length_exceeded"
    assert "leaving room for 5" in refused.value.body["message"]
    for too_long in (list(range(1, context + 2)), list(range(1, context + 1))):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="faq", prompt=too_long, max_tokens=1)
        assert (refused.value.body["param"], refused.value.body["code"]) == (
            "prompt",
            "context_length_exceeded",
        )
    chat_prompt = [{"role": "user", "content": "x" * (context * 16 + 1)}]  # past it untokenized
    for field, args in (
        ("max_completion_tokens", dict(messages=QUESTION, max_completion_tokens=context)),
        ("messages", dict(messages=chat_prompt, max_tokens=1)),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="faq", **args)
        assert (refused.value.body["param"], refused.value.body["code"]) == (
            field,
            "context_length_exceeded",
        )
        assert refused.value.body["message"].startswith(f"{field}: ")
    # Without max_tokens: the default (16), cut to the room left; so, as the offline engine.
    reply = client.completions.create(model="faq", prompt=prompt, extra_body={"ignore_eos": True})
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (5, "length")
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.0, seed=None)
    assert len(reference.generate([prompt], params, adapters=["faq"])[0].token_ids) == 5


def test_a_batch_larger_than_the_waiting_queue_is_a_400_not_a_retryable_503(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_waiting: 6") as refused:
        client.completions.create(model="faq", prompt=["a"] * 7, max_tokens=1)
    assert refused.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="faq", prompt=["a"] * 2, n=4, max_tokens=1)
    assert refused.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="faq", messages=QUESTION, n=7, max_tokens=1)
    assert refused.value.body["param"] == "n"
    reply = client.completions.create(model="faq", prompt=["a"] * 3, n=2, max_tokens=1)
    assert len(reply.choices) == MAX_WAITING


def test_vllm_stop_token_ids_include_stop_str_in_output_and_top_k_minus_one(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    [expected] = reference.generate(["Hello there"], greedy, adapters=["faq"])
    ids = expected.token_ids

    def complete(**extra):
        body = {"ignore_eos": True, **extra}
        args = dict(model="faq", prompt="Hello there", max_tokens=12, temperature=0)
        return client.completions.create(**args, extra_body=body).choices[0]

    stopped = complete(stop_token_ids=[ids[3]])
    first = ids.index(ids[3])  # the first time that token comes
    assert stopped.finish_reason == "stop"
    assert stopped.text == reference.tokenizer.decode(ids[:first], skip_special_tokens=True)
    assert complete(top_k=-1).text == expected.text
    stop = expected.text[len(expected.text) // 2 :][:3]
    kept = client.completions.create(
        model="faq",
        prompt="Hello there",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    ).choices[0]
    assert kept.text == expected.text[: expected.text.index(stop) + len(stop)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_tokens", 4),
        ("min_p", 0.1),
        ("use_beam_search", True),
        ("guided_choice", ["yes", "no"]),
        ("guided_json", {"type": "object"}),
        ("structured_outputs", {"choice": ["yes", "no"]}),
        ("allowed_token_ids", [5]),
        ("bad_words", ["yes"]),
        ("truncate_prompt_tokens", 2),
        ("skip_special_tokens", False),
        ("add_generation_prompt", False),
        ("continue_final_message", True),
        ("chat_template_kwargs", {"enable_thinking": False}),
        ("echo", True),
        ("top_k", -2),
    ],
)
def test_a_vllm_extension_not_served_is_refused_by_name(server, field, value):
    url, _, _ = server
    reply = _post(url, "/chat/completions", {"messages": QUESTION, field: value})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field
    off = {
        "min_tokens": 0,
        "min_p": 0.0,
        "use_beam_search": False,
        "top_k": -1,
        "skip_special_tokens": True,
        "add_generation_prompt": True,
        "echo": False,
    }
    if field in off:  # its "off" value is served
        assert _post(url, "/chat/completions", {"messages": QUESTION, field: off[field]}).is_success


def test_completions_without_the_tokenizers_special_tokens_are_refused_by_name(server):
    url, _, _ = server
    asked = {"prompt": "Hi", "max_tokens": 1}
    assert _post(url, "/completions", {**asked, "add_special_tokens": True}).is_success
    refused = _post(url, "/completions", {**asked, "add_special_tokens": False})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "add_special_tokens"


def test_echo_with_max_tokens_0_scores_the_prompt_only(server):
    url, reference, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    prompt = [1, 300, 301, 302, 303]
    for stream in (False, True):
        asked = dict(model="faq", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        if stream:
            chunks = list(client.completions.create(**asked, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            assert chunks[-1].choices[0].finish_reason == "length"
            tokens = [
                t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
            ]
        else:
            reply = client.completions.create(**asked)
            assert reply.usage.completion_tokens == 0
            text, tokens = reply.choices[0].text, reply.choices[0].logprobs.tokens
        assert text == reference.tokenizer.decode(prompt)
        assert len(tokens) == len(prompt)
    scored = client.completions.create(**asked).choices[0].logprobs.token_logprobs
    [expected] = reference.generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), adapters=["faq"]
    )
    assert scored[1:] == pytest.approx([e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-5)
    # The token computed and dropped would have stopped the answer: no token is "length".
    stopping = {"logit_bias": {"7": 100}, "extra_body": {"stop_token_ids": [7]}}
    hidden = client.completions.create(**asked, **stopping).choices[0]
    assert (hidden.text, hidden.finish_reason) == (text, "length")
    with pytest.raises(openai.BadRequestError, match="only allowed with echo"):
        client.completions.create(model="faq", prompt=prompt, max_tokens=0)


def test_stream_options_without_stream_is_refused(server):
    url, _, _ = server
    body = {"messages": QUESTION, "stream_options": {"include_usage": True}}
    reply = _post(url, "/chat/completions", body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream_options"


def test_models_are_retrieved_one_by_one_and_unknown_ones_leak_no_registry_detail(server):
    url, _, _ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    faq = client.models.retrieve("faq")
    assert (faq.id, faq.object, faq.owned_by) == ("faq", "model", "loraplex")
    assert client.models.retrieve("tiny").id == "tiny"
    for missing in ("nope", "nope/3"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(missing)
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model=missing, messages=QUESTION, max_tokens=1)
        error = unknown.value.body
        assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
        assert "sqlite" not in error["message"] and "does not exist" in error["message"]


def test_unknown_routes_and_methods_get_openai_shaped_errors(server):
    url, _, _ = server
    for method, path, status in (
        ("GET", "/nothing", 404),
        ("GET", "/chat/completions", 405),
        ("DELETE", "/models", 405),
    ):
        reply = httpx.request(method, f"{url}{path}", timeout=30)
        assert reply.status_code == status
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and path in error["message"]


@pytest.mark.parametrize(
    ("content", "headers", "message"),
    [
        (b'{"model": "faq",}', {"Content-Type": "application/json"}, "is not valid JSON: "),
        (b"", {"Content-Type": "application/json"}, "is missing: send a JSON object"),
        (b'["faq"]', {"Content-Type": "application/json"}, "must be a JSON object"),
        (b'{"model": "faq"}', {}, "Content-Type: application/json"),  # curl -d's form type
    ],
    ids=["invalid-json", "empty", "array", "no-content-type"],
)
def test_a_body_that_is_not_a_json_object_is_named_as_such_not_as_a_field(
    server, content, headers, message
):
    url, _, _ = server
    reply = httpx.post(f"{url}/chat/completions", content=content, headers=headers, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] is None and error["type"] == "invalid_request_error"
    assert error["message"].startswith("the request body ") and message in error["message"]


def test_with_usage_asked_every_chunk_but_the_last_carries_usage_null(server):
    url, _, _ = server
    for path, body in (
        ("/chat/completions", {"messages": QUESTION}),
        ("/completions", {"prompt": "Hello", "n": 2}),
    ):
        asked = {**body, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}{path}", json={"model": "faq", **asked}) as reply:
            lines = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
        assert lines[-1] == "[DONE]"
        *chunks, last = [json.loads(line) for line in lines[:-1]]
        assert len(chunks) > 2 and all(c["usage"] is None and c["choices"] for c in chunks)
        assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1
        with httpx.stream(
            "POST", f"{url}{path}", json={"model": "faq", **asked, "stream_options": None}
        ) as reply:
            unasked = [json.loads(line[6:]) for line in reply.iter_lines() if line[6:7] == "{"]
        assert all("usage" not in c for c in unasked)


def test_a_union_fields_error_names_the_field_not_the_branch(server):
    url, _, _ = server
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    reply = _post(url, "/chat/completions", {"messages": [image]})
    assert reply.json()["error"]["param"] == "messages.0.content.0.type"
    reply = _post(url, "/completions", {"prompt": ["a", 3]})
    assert reply.json()["error"]["param"] in ("prompt.0", "prompt.1")  # no `list[int]` in it


def test_logprob_bytes_rebuild_split_characters_and_offsets_index_the_text(server):
    url, reference, _ = server
    tokenizer = reference.engine.tokenizer
    text = "日本語 ok"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert len(ids) > len(text.split())  # characters split across byte-level tokens
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    echo = dict(model="faq", prompt=text, max_tokens=0, echo=True, logprobs=0)
    scores = client.completions.create(**echo).choices[0].logprobs
    offsets = scores.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    # Each offset is where the token's first whole character starts in the text.
    pieces = [text[a:b] for a, b in zip(offsets, [*offsets[1:], len(text)], strict=True)]
    # A character's tokens before its last byte start where it does: their pieces are empty.
    assert [p for p in pieces if p] == ["日", "本", "語", " ok"]
    streamed = list(client.completions.create(**echo, stream=True))
    assert [
        o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ] == offsets

    # The bytes of a token are its own: joined, they are the text's UTF-8, split characters too.
    from serve.openai_logprobs import LogprobsFormatter

    bytes_of = LogprobsFormatter(tokenizer).bytes_of
    assert b"".join(bytes_of(t) for t in ids) == text.encode()
    reply = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=12, temperature=0, logprobs=True
    )
    [expected] = reference.chat(QUESTION, SamplingParams(max_tokens=12, temperature=0))
    got = [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]
    assert got == [bytes_of(t) for t in expected.token_ids]


@pytest.mark.parametrize(
    ("message", "names"),
    [
        ({"role": "tool", "tool_call_id": "c1", "content": "42"}, "of role 'tool'"),
        ({"role": "function", "name": "f", "content": "42"}, "of role 'function'"),
        (  # OpenAI's null content beside a call
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function"}],
            },
            "with tool_calls",
        ),
        (  # text and a call: the call was left out silently
            {"role": "assistant", "content": "Let me see.", "tool_calls": [{"id": "c1"}]},
            "with tool_calls",
        ),
        ({"role": "assistant", "content": "", "function_call": {"name": "f"}}, "function_call"),
    ],
)
def test_function_calling_in_the_history_is_refused_as_such(server, message, names):
    url, _, _ = server
    history = [*QUESTION, message, {"role": "user", "content": "And then?"}]
    reply = _post(url, "/chat/completions", {"messages": history, "max_tokens": 2})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "messages.1"
    assert "function calling is not supported by this server" in error["message"]
    assert names in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("web_search_options", {}),
        ("reasoning_effort", "low"),
        ("verbosity", "low"),
    ],
)
def test_openai_fields_for_other_kinds_of_answer_are_refused_naming_them(server, field, value):
    url, _, _ = server
    reply = _post(url, "/chat/completions", {"messages": QUESTION, "max_tokens": 2, field: value})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field
    plain = {"messages": QUESTION, "max_tokens": 2, "modalities": ["text"]}
    assert _post(url, "/chat/completions", plain).status_code == 200


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_continuous_usage_stats_put_each_choices_usage_so_far_on_every_chunk(server, path):
    url, _, _ = server
    asked = {"max_tokens": 5, "n": 2, "stream": True, "temperature": 1.0, "seed": 3}
    asked |= {"messages": QUESTION} if path == "/chat/completions" else {"prompt": "Hello"}
    asked["extra"] = {"ignore_eos": True}
    asked |= asked.pop("extra")
    options = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream(
        "POST", f"{url}{path}", json={"model": "faq", **asked, "stream_options": options}
    ) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines[:-1]]
    *per_choice, total = chunks
    assert total["choices"] == [] and total["usage"]["completion_tokens"] == 10
    prompt = total["usage"]["prompt_tokens"]
    seen = [0, 0]
    for chunk in per_choice:
        k = chunk["choices"][0]["index"]
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] >= seen[k]
        assert usage["total_tokens"] == prompt + usage["completion_tokens"]
        seen[k] = usage["completion_tokens"]
    assert seen == [5, 5]
    # without continuous_usage_stats, only the last chunk carries it (OpenAI's)
    options["continuous_usage_stats"] = False
    with httpx.stream(
        "POST", f"{url}{path}", json={"model": "faq", **asked, "stream_options": options}
    ) as reply:
        lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert [json.loads(line)["usage"] is None for line in lines[:-2]] == [True] * (len(lines) - 2)


def test_a_default_max_tokens_of_null_leaves_an_answer_all_the_room_in_the_context():
    from serve.prompt_reader import PromptReader
    from serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(model="faq", messages=QUESTION)
    assert PromptReader(None, 100, None).max_tokens_for(body, 30, "max_tokens") == 70
    assert PromptReader(None, 100, 16).max_tokens_for(body, 30, "max_tokens") == 16


def test_null_in_stream_options_means_the_default_too(server):
    url, _, _ = server
    options = {"include_usage": None, "continuous_usage_stats": None}
    body = {"model": "faq", "messages": QUESTION, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", f"{url}/chat/completions", json={**body, "stream_options": options}
    ) as reply:
        assert reply.status_code == 200
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(event) for event in events[:-1])

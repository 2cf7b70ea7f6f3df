"""JSON-constrained decoding (`response_format`): greedy and sampled outputs parse and match their
schema, unguided rows of the same batch are untouched, preemption keeps the grammar state, bad
formats are refused early, and the server honours it for the stock `openai` client."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
import torch

from serve import LLM, SamplingParams
from serve.guided import unpack_bitmask, unpack_bits
from tests.helpers import running_server

JSON_OBJECT = {"type": "json_object"}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string", "maxLength": 24},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "student"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with name and age."}]
ASK_CAPITAL = [{"role": "user", "content": "What is the capital of Norway? Answer in JSON."}]
ASK_SEA = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(base_model=str(smollm2.path), quantization=None, num_kv_blocks=256)


def assert_person(text: str) -> None:
    """The schema's rules, checked directly (jsonschema is not a dependency)."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) <= set(PERSON["properties"])
    assert {"name", "age", "student"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 24
    assert type(value["age"]) is int and value["age"] >= 0
    assert type(value["student"]) is bool
    assert isinstance(value.get("city", ""), str)


@pytest.mark.slow
def test_greedy_json_object_output_parses(llm):
    params = SamplingParams(max_tokens=48, temperature=0, response_format=JSON_OBJECT)
    outputs = llm.chat([ASK_PERSON, ASK_CAPITAL], params)
    for out in outputs:
        assert out.finish_reason == "stop"
        assert isinstance(json.loads(out.text), dict)


@pytest.mark.slow
def test_greedy_json_schema_output_matches_the_schema(llm):
    params = SamplingParams(max_tokens=64, temperature=0, response_format=PERSON_FORMAT)
    for out in llm.chat([ASK_PERSON, ASK_CAPITAL, ASK_SEA], params):
        assert out.finish_reason == "stop"
        assert_person(out.text)


@pytest.mark.slow
def test_seeded_sampling_at_temperature_1_still_matches_the_schema(llm):
    params = [
        SamplingParams(max_tokens=64, temperature=1.0, seed=seed, response_format=PERSON_FORMAT)
        for seed in range(3)
    ]
    outputs = llm.chat([ASK_PERSON] * 3, params)
    for out in outputs:
        assert out.finish_reason == "stop"
        assert_person(out.text)
    assert len({out.text for out in outputs}) > 1  # really sampled


@pytest.mark.slow
def test_unguided_rows_are_unchanged_by_guided_rows_in_the_batch(llm):
    free = SamplingParams(max_tokens=24, temperature=0)
    guided = SamplingParams(max_tokens=24, temperature=0, response_format=PERSON_FORMAT)
    alone = llm.chat([ASK_CAPITAL, ASK_SEA], free)
    mixed = llm.chat([ASK_PERSON, ASK_CAPITAL, ASK_SEA, ASK_CAPITAL], [guided, free, free, guided])
    assert [o.token_ids for o in mixed[1:3]] == [o.token_ids for o in alone]
    [guided_alone] = llm.chat([ASK_CAPITAL], guided)
    assert mixed[3].token_ids == guided_alone.token_ids


@pytest.mark.slow
def test_max_tokens_cuts_the_json_with_finish_reason_length(llm):
    params = SamplingParams(max_tokens=3, temperature=0, response_format=PERSON_FORMAT)
    [out] = llm.chat([ASK_PERSON], params)
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_preempted_guided_sequences_resume_with_identical_tokens(tiny_base):
    import llguidance
    import llguidance.hf

    from serve.response_format import grammar

    prompts = [[1, 50 + i, 60, 70, 80, 90, 100, 110] for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, response_format=JSON_OBJECT)
    roomy = LLM(base_model=str(tiny_base.path), quantization=None, num_kv_blocks=64, block_size=4)
    tight = LLM(base_model=str(tiny_base.path), quantization=None, num_kv_blocks=14, block_size=4)
    expected = roomy.generate(prompts, params)
    outputs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    tokenizer = llguidance.hf.from_tokenizer(roomy.tokenizer)
    for out in outputs:  # every token obeys the grammar (the random model wants anything else)
        matcher = llguidance.LLMatcher(tokenizer, grammar(json.dumps({"type": "object"})))
        assert matcher.consume_tokens(out.token_ids), matcher.get_error()
        assert out.text.startswith("{")
    assert not tight.engine.guided._matchers  # finished requests leave no grammar state


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ({"type": "xml"}, "response_format.type"),
        ("json", "response_format must be an object"),
        ({"type": "json_schema"}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "nonsense"),
        ({"type": "json_schema", "json_schema": {"schema": {"required": 3}}}, "required"),
    ],
)
def test_invalid_response_format_is_a_value_error_naming_the_field(fmt, message):
    with pytest.raises(ValueError, match="response_format") as error:
        SamplingParams(response_format=fmt)
    assert message in str(error.value)


def test_text_format_means_no_constraint_and_params_stay_hashable():
    assert SamplingParams(response_format={"type": "text"}).response_format is None
    a = SamplingParams(response_format=PERSON_FORMAT)
    b = SamplingParams(response_format=json.loads(json.dumps(PERSON_FORMAT)))
    assert a == b and hash(a) == hash(b)


def test_a_schema_beside_json_object_is_enforced_like_json_schema():
    # instructor's JSON_SCHEMA mode (RAGAS' judges), Together and Fireworks send this shape.
    beside = SamplingParams(response_format={"type": "json_object", "schema": PERSON})
    assert beside.response_format == SamplingParams(response_format=PERSON_FORMAT).response_format
    assert beside.response_format != SamplingParams(response_format=JSON_OBJECT).response_format


def test_server_requests_keep_a_schema_beside_json_object():
    from serve.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": ASK_PERSON}
    beside = {**JSON_OBJECT, "schema": PERSON}
    for fmt, expected in ((JSON_OBJECT, JSON_OBJECT), (beside, PERSON_FORMAT)):
        request = ChatCompletionRequest.model_validate({**body, "response_format": fmt})
        params = request.sampling_params(16)
        assert params == SamplingParams(max_tokens=16, response_format=expected)


@pytest.mark.parametrize(
    ("bits", "vocab", "allowed"),
    [
        ([0], 32, []),
        ([-1], 32, list(range(32))),
        ([0b101, 0], 64, [0, 2]),
        ([-(1 << 31), 0], 64, [31]),  # the sign bit is token 31
        ([0, 0b1000_0001 | 1 << 8], 40, [32, 39]),  # vocab 40 cuts token 40 off
        ([-1], 40, list(range(32))),  # tokens past the bitmask are not allowed
    ],
)
def test_unpack_bitmask_reads_bit_t_mod_32_of_word_t_div_32(bits, vocab, allowed):
    mask = unpack_bitmask(np.array([bits], dtype=np.int32), vocab)
    assert mask.shape == (1, vocab) and mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == allowed


def test_unpack_bits_off_the_cpu_is_numpys_unpackbits():
    """The path a GPU takes, run here on CPU tensors of awkward widths."""
    rng = np.random.default_rng(0)
    for rows, width in ((1, 1), (3, 7), (5, 1540)):
        packed = rng.integers(0, 256, size=(rows, width), dtype=np.uint8)
        expected = np.unpackbits(packed, axis=1, bitorder="little")
        assert np.array_equal(unpack_bits(torch.from_numpy(packed)).numpy(), expected)


@pytest.mark.parametrize(
    ("guided_rows", "sampled"),
    [([0, 2], [0, 1, 2]), ([0, 1, 2], [0, 1, 2]), ([1], [0, 1, 2]), ([0, 1, 2], [0, 2])],
)
def test_mask_forbids_exactly_the_tokens_each_rows_grammar_forbids(tiny_base, guided_rows, sampled):
    """Batched masking against each row's own bitmask from llguidance, unpacked by numpy; rows
    at different points of their grammar, unguided rows untouched; masks made for more
    sequences than are sampled (one ended while the device computed) fit the rest."""
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask
    from transformers import AutoTokenizer

    from serve.guided import GuidedDecoding
    from serve.response_format import grammar
    from serve.sequence import Sequence

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    vocab = len(tokenizer)
    guide = GuidedDecoding(tokenizer, vocab, [tokenizer.eos_token_id])
    written = ["", '{"name": "Ada', "{"]  # each row's output so far
    seqs = []
    for row, text in enumerate(written):
        fmt = PERSON_FORMAT if row in guided_rows else None
        output = tokenizer.encode(text, add_special_tokens=False)
        seq = Sequence(f"r{row}", [1, 2, *output], 2, SamplingParams(response_format=fmt))
        if fmt is not None:
            guide.start(seq.request_id, seq.params.response_format)
        seqs.append(seq)
    masks = guide.masks(seqs)
    seqs = [seqs[i] for i in sampled]
    logits = torch.randn(len(seqs), vocab)
    masked = logits.clone()
    guide.mask_(masked, seqs, masks)
    guided_rows = [sampled.index(i) for i in guided_rows if i in sampled]
    schema = seqs[guided_rows[0]].params.response_format.json_schema
    for row, seq in enumerate(seqs):
        if row not in guided_rows:
            assert torch.equal(masked[row], logits[row])
            continue
        matcher = llguidance.LLMatcher(guide.tokenizer, grammar(schema))
        assert matcher.consume_tokens(seq.output_token_ids), matcher.get_error()
        bitmask = np.zeros((1, (guide.tokenizer.vocab_size + 31) // 32), dtype=np.int32)
        fill_next_token_bitmask(matcher, bitmask, 0)
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        assert 0 < allowed.sum() < vocab
        expected = logits[row].masked_fill(~torch.from_numpy(allowed), float("-inf"))
        assert torch.equal(masked[row], expected)


# -- through the server ---------------------------------------------------------------------


@pytest.fixture
def client(llm, tmp_path):
    """The module's engine behind uvicorn for one test (offline use resumes afterwards)."""
    from serve.async_engine import AsyncLLM
    from serve.serve_config import ServeConfig
    from serve.server import create_app

    engine = AsyncLLM(llm.engine)
    config = ServeConfig(default_max_tokens=64, audit={"path": tmp_path / "audit.jsonl"})
    try:
        with running_server(create_app(engine, "smollm2", config)) as url:
            yield openai.OpenAI(base_url=url, api_key="unused")
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_server_json_object_gives_parseable_json_to_the_openai_client(client, llm):
    reply = client.chat.completions.create(
        model="smollm2",
        messages=ASK_CAPITAL,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    reply = client.chat.completions.create(
        model="smollm2",
        messages=ASK_PERSON,
        temperature=0,
        response_format=PERSON_FORMAT,
    )
    assert_person(reply.choices[0].message.content)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
    ],
)
def test_server_refuses_a_bad_response_format_with_400(client, fmt):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="smollm2", messages=ASK_CAPITAL, max_tokens=4, response_format=fmt
        )
    assert error.value.status_code == 400
    body = error.value.body
    assert body["type"] == "invalid_request_error"
    assert body["param"].startswith("response_format")

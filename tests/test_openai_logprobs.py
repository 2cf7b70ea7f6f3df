"""Completions' `text_offset` with `echo`: each token's offset is where its text starts in
the echoed prompt plus completion, whatever special tokens the tokenizer adds."""

from __future__ import annotations

import json

import pytest

from serve.openai_logprobs import MIN_LOGPROB, CompletionLogprobs, LogprobsFormatter
from serve.outputs import RequestOutput
from serve.prompts import text_prompt_ids
from serve.sampler import TokenLogprobs


@pytest.fixture
def bos_tokenizer(smollm2):
    """SmolLM2's tokenizer made to add a BOS to text, as Llama 3's and Mistral's do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    return tokenizer


def _offsets(tokenizer, prompt: str, completion: str, echo: bool) -> tuple[list, list]:
    prompt_ids = text_prompt_ids(tokenizer, prompt)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    scored = [TokenLogprobs(t, -1.0, []) for t in prompt_ids + ids]
    final = RequestOutput(
        "r", prompt_ids, completion, ids, True, "length", None,
        logprobs=scored[len(prompt_ids) :], prompt_logprobs=[None, *scored[1 : len(prompt_ids)]],
    )  # fmt: skip
    scores = CompletionLogprobs(LogprobsFormatter(tokenizer), prompt, True, echo).take(final)
    return scores["tokens"], scores["text_offset"]


def test_echoed_offsets_index_the_text_though_the_tokenizer_added_a_bos(bos_tokenizer):
    prompt, completion = "Hello there", " friend, 日本"
    tokens, offsets = _offsets(bos_tokenizer, prompt, completion, echo=True)
    text = prompt + completion
    assert tokens[:3] == ["<|endoftext|>", "Hello", " there"]
    assert offsets[:3] == [0, 0, 5]  # the BOS is in no text: it starts at 0, with no width
    for token, offset in zip(tokens[1:], offsets[1:], strict=True):
        assert text[offset:].startswith(token) or "\ufffd" in token, (token, offset)
    # The completion's offsets are the same with the prompt echoed or not.
    plain = _offsets(bos_tokenizer, prompt, completion, echo=False)
    assert plain == (tokens[3:], offsets[3:])


def test_a_tokens_own_logprob_heads_its_top_logprobs_though_an_alternative_reads_the_same(
    smollm2,
):
    """Halves of characters all read U+FFFD: an alternative overwrote the sampled token's
    own logprob, which OpenAI always returns."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    spelled = bytes_to_unicode()
    half, other_half = (tokenizer.convert_tokens_to_ids(spelled[b]) for b in (0xA1, 0xA2))
    formatter = LogprobsFormatter(tokenizer)
    scored = TokenLogprobs(half, -1.5, [(half, -1.5), (other_half, -0.5)])
    [top] = formatter.completion([half], [scored], [0])["top_logprobs"]
    assert top == {"\ufffd": -1.5}


def test_an_id_past_the_tokenizer_in_a_padded_embedding_reads_as_no_bytes(tokenizer):
    """Qwen2.5's embedding is padded past its tokenizer to a round size: such an id, sampled
    (a `logit_bias`) or among the alternatives, has no spelling; it failed the response."""
    padded = len(tokenizer) + 40
    formatter = LogprobsFormatter(tokenizer)
    [entry] = formatter.chat([TokenLogprobs(padded, -2.0, [(padded, -2.0), (28, -3.0)])])["content"]
    assert (entry["token"], entry["bytes"]) == ("", [])
    assert [t["token"] for t in entry["top_logprobs"]] == ["", ","]


def test_logprobs_json_cannot_hold_are_null_for_nan_and_vllms_floor_for_minus_infinity(tokenizer):
    """The server's JSON is strict: a broken adapter's NaN logprobs made every answer a 500
    (and a gate through the server could not run, where in process it failed the candidate)."""
    nan, inf = float("nan"), float("inf")
    formatter = LogprobsFormatter(tokenizer)
    scored = TokenLogprobs(28, nan, [(28, nan), (29, -inf)])
    [entry] = formatter.chat([scored])["content"]
    assert entry["logprob"] is None
    assert [t["logprob"] for t in entry["top_logprobs"]] == [None, MIN_LOGPROB]
    completion = formatter.completion([28, 29], [None, scored], [0, 1])
    assert completion["token_logprobs"] == [None, None]
    assert list(completion["top_logprobs"][1].values()) == [None, MIN_LOGPROB]
    json.dumps([entry, completion], allow_nan=False)  # what the server sends

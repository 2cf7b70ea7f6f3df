"""Incremental detokenization: streaming a decode window per step gives the text of decoding
the whole output at once, and no half characters."""

from __future__ import annotations

import pytest

from serve.outputs import RequestState
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence, Status

TEXTS = [
    "Plain English, with punctuation: commas, dots... and 'quotes'.",
    "Bygglov krävs för en friggebod över 15 m² i Sverige — ja, även på Åland?",
    "東京は日本の首都です。北京是中国的首都。🙂👍🏽 done",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
]


def stream(tokenizer, prompt: list[int], output: list[int], stop=()) -> tuple[str, list[str]]:
    """Feed `output` one token per step as the engine does; (final text, the deltas)."""
    params = SamplingParams(max_tokens=len(output), stop=list(stop), ignore_eos=True)
    seq = Sequence("r", list(prompt), len(prompt), params)
    state = RequestState(seq, tokenizer)
    deltas = []
    for token in output:
        seq.append_token(token)
        state.update(None, [])
        if state.stopped_by_string:
            seq.status = Status.FINISHED_STOPPED
        out = state.output()
        deltas.append(out.delta_text)
        if out.finished:
            break
    return out.text, deltas


@pytest.mark.parametrize("text", TEXTS, ids=["english", "swedish", "cjk-emoji", "spaces"])
def test_streamed_text_is_the_whole_decode_and_never_half_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    final, deltas = stream(tokenizer, [1, 2, 3], ids)
    assert final == tokenizer.decode(ids, skip_special_tokens=True) == "".join(deltas)
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_in_the_output_are_skipped(tokenizer):
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    final, _ = stream(tokenizer, [1], [*ids[:1], special, *ids[1:]])
    assert final == "Hello there"


def test_a_stop_string_split_over_tokens_cuts_the_text(tokenizer):
    ids = tokenizer("The answer is 42. STOP here, then more text", add_special_tokens=False)
    final, deltas = stream(tokenizer, [1], ids["input_ids"], stop=["STOP"])
    assert final == "The answer is 42. " == "".join(deltas)


def sentencepiece_tokenizer():
    """A tokenizer with Llama 2's and Mistral's decoder (as transformers converts their
    SentencePiece model): `▁` for a space, byte fallback, and the first space stripped."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "!", "▁how", "<0xC3>", "<0xA9>"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, "<unk>"))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_a_sentencepiece_output_keeps_the_space_before_its_first_word():
    tokenizer = sentencepiece_tokenizer()
    prompt, output = [1, 3], [4, 6, 5, 2]  # <s> ▁Hello | ▁world ▁how ! </s>
    final, deltas = stream(tokenizer, prompt, output)
    whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert whole == "Hello world how!"
    assert final == " world how!" == "".join(deltas)  # decoded alone: "world how!"

    from serve.openai_logprobs import LogprobsFormatter

    tokens = LogprobsFormatter(tokenizer)
    assert [tokens.token(t) for t in output[:3]] == [" world", " how", "!"]


def test_a_prompt_ending_inside_a_character_is_not_decoded_with_the_output():
    """The first window starts in the prompt unless the prompt's tail is half a character:
    the output's first byte would complete it into text the prompt's decode does not
    prefix. Then the output is decoded alone, as before."""
    tokenizer = sentencepiece_tokenizer()
    prompt, output = [1, 3, 7], [8, 4]  # ... <0xC3> | <0xA9> ▁world: "é" split over both
    final, deltas = stream(tokenizer, prompt, output)
    assert final == tokenizer.decode(output, skip_special_tokens=True) == "".join(deltas)

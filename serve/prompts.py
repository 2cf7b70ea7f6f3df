"""How a prompt becomes token ids: one rule for the engine, the server, the gate and the
benchmarks, so what the gate measures is what the server serves."""

from __future__ import annotations

import re

from registry.errors import UsageError

# Stand-ins for the messages' contents while the template renders: private-use characters,
# which no template writes and no whitespace trim removes.
_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000(\\d+)\ue001")


def chat_prompt_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Messages through the base model's chat template, ready for the answer (without
    `add_generation_prompt`: as a history, no answer opened). The template writes the special
    tokens it wants, so the tokenizer adds none; the text of a special token typed in a
    message (`<|im_end|>`) stays text, or a user could end their turn and open a system one."""
    opened = add_generation_prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=opened)
    typed = _typed_special_tokens(tokenizer, messages, text, opened)
    ids, at = [], 0
    for start, end in typed:
        ids += tokenizer(text[at:start], add_special_tokens=False)["input_ids"]
        piece = text[start:end]
        ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = end
    return ids + tokenizer(text[at:], add_special_tokens=False)["input_ids"]


def text_prompt_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """A plain-text prompt, with the tokenizer's special tokens (a BOS where the model has one)
    unless told not to add them."""
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _typed_special_tokens(
    tokenizer, messages: list[dict], text: str, opened: bool
) -> list[tuple[int, int]]:
    """Where in the rendered `text` the messages' contents spell special tokens: (start, end)
    spans, in order. Found by rendering the template again with a mark for each content and
    putting the contents (as they are, or trimmed, as templates often write them) back."""
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    pattern = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
    typed = [(i, found) for i, m in enumerate(messages) if (found := pattern.search(m["content"]))]
    if not typed:
        return []  # the usual case: one render
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=opened)
    pieces = _MARKS.split(skeleton)  # template text, message index, template text, ...
    for written in (str, str.strip):
        parts, spans, at = [], [], 0
        for i, part in enumerate(pieces):
            if i % 2:
                part = written(messages[int(part)]["content"])
                spans += [(at + m.start(), at + m.end()) for m in pattern.finditer(part)]
            parts.append(part)
            at += len(part)
        if "".join(parts) == text:
            return spans
    i, found = typed[0]
    raise UsageError(
        f"messages[{i}].content holds the text of the special token {found[0]!r}, which this "
        "model's chat template rewrites so that it cannot be kept as text",
        param=f"messages[{i}].content",
    )

"""Training data: local files in three shapes, the chat template, answer-only labels, splits.

Shapes (detected from the columns unless `data.format` names one):
- alpaca: `instruction`, optional `input`, `output`
- chat: `messages` ({role, content}) or ShareGPT `conversations` ({from, value})
- text: `text`, trained on every token
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.errors import ConfigError

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
# A data file's suffix -> the `datasets` loader that reads it.
DATA_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def load_records(path: Path):
    """All records of a local data file as a `datasets.Dataset` (no hub, no network)."""
    from datasets import config, load_dataset

    # `datasets` caches a local file by its path and modification time: rewritten with its
    # old time (`cp -p`, `rsync -t`), it would serve the old records under the new data
    # hash. A cache of each content of its own cannot.
    cache = Path(config.HF_DATASETS_CACHE) / "by-content" / data_hash(path).split(":")[1]
    loader = DATA_LOADERS[path.suffix]
    return load_dataset(loader, data_files=str(path), split="train", cache_dir=str(cache))


def data_hash(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:24]


# Each shape and the columns it needs: all of one of its alternatives.
_COLUMNS = {
    "alpaca": [{"instruction", "output"}],
    "chat": [{"messages"}, {"conversations"}],
    "text": [{"text"}],
}


def _has_columns(fmt: str, columns: list[str]) -> bool:
    return any(needed <= set(columns) for needed in _COLUMNS[fmt])


def detect_format(columns: list[str], path: Path) -> str:
    for fmt in _COLUMNS:
        if _has_columns(fmt, columns):
            return fmt
    raise ConfigError(
        f"data.path: {path.name} has columns {sorted(columns)}; expected alpaca "
        "(instruction, output), chat (messages or conversations) or text (text)"
    )


def check_format(fmt: str, columns: list[str], path: Path) -> str:
    """`fmt` if the data has its columns; ConfigError names `data.format` and what was found."""
    if not _has_columns(fmt, columns):
        needed = " or ".join(", ".join(sorted(c)) for c in _COLUMNS[fmt])
        raise ConfigError(
            f"data.format: {fmt} needs the columns {needed}; {path.name} has {sorted(columns)}"
        )
    return fmt


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The record as chat messages [{role, content}]; ValueError says what is wrong with it."""
    if fmt == "alpaca":
        prompt = _text(record, "instruction")
        if record.get("input") is not None and str(record["input"]):
            prompt = f"{prompt}\n\n{record['input']}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record, "output")},
        ]
    if record.get("messages") is not None:
        turns, role_key, content_key, roles = record["messages"], "role", "content", None
    else:
        turns, role_key, content_key, roles = (
            record.get("conversations"),
            "from",
            "value",
            _SHAREGPT_ROLES,
        )
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no messages")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"a message is {turn!r}, not a mapping")
        role = turn.get(role_key)
        if roles is not None:
            if role not in roles:
                raise ValueError(f"{role_key} {role!r} is none of {sorted(roles)}")
            role = roles[role]
        elif role not in ("system", "user", "assistant"):
            raise ValueError(f"role {role!r} is none of system, user, assistant")
        messages.append({"role": role, "content": _text(turn, content_key)})
    return messages


def _text(record: dict, column: str) -> str:
    """A text field; a number (a CSV column of numbers loads as ints) as its digits."""
    value = record.get(column)
    if value is None or isinstance(value, (list, dict)):
        raise ValueError(f"{column!r} is {'missing' if value is None else 'not text'}")
    return str(value)


def encode(record: dict, fmt: str, tokenizer, max_length: int) -> dict:
    """Token ids and labels of one record; labels are IGNORE_INDEX except on answer tokens.

    Each assistant turn is tokenized apart from the prompt before it, exactly as the engine
    will see it at inference: prompt tokens (with the generation prompt), then answer tokens.
    """
    if fmt == "text":
        ids = tokenizer(_text(record, "text"), add_special_tokens=True)["input_ids"]
        ids = ([*ids, tokenizer.eos_token_id])[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    messages = to_messages(record, fmt)
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:  # an opening answer answers nothing
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ConfigError(
                "the base model's chat template does not render conversations as growing "
                "prefixes, so answer tokens cannot be told from prompt tokens"
            )
        context = _tokens(tokenizer, prompt[len(rendered) :])
        answer = _tokens(tokenizer, full[len(prompt) :])
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        rendered = full
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_indices(
    keys: list[str | list[str]], validation: float, test: float, seed: int
) -> dict[str, list[int]]:
    """A deterministic split of record indices; records sharing a key land in the same part.

    A record's keys (`prompt_keys`; a string is one key) are what it asks first and each
    exchange it trains on, so neither a question asked twice in the data nor an exchange
    repeated in another conversation can be trained on and then tested. Sizes below 1 are
    shares, others are counts, both of groups of records joined by their keys.
    """
    members = _groups([[k] if isinstance(k, str) else k for k in keys])
    n = len(members)
    sizes = {
        name: int(size) if size >= 1 else round(size * n)
        for name, size in (("validation", validation), ("test", test))
    }
    if sizes["validation"] < 1 or sizes["test"] < 1 or sum(sizes.values()) >= n:
        raise ConfigError(
            f"data.split: validation={validation} and test={test} of {n} distinct prompts "
            f"({len(keys)} records; those sharing a prompt or an exchange count once) leave "
            f"validation={sizes['validation']}, test={sizes['test']}, "
            f"train={n - sum(sizes.values())}; each needs at least 1"
        )
    order = [members[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val, n_test = sizes["validation"], sizes["test"]
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {name: sorted(i for group in part for i in group) for name, part in parts.items()}


def _groups(keys: list[list[str]]) -> list[list[int]]:
    """Record indices joined through shared keys (union-find), in order of their first record."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    first: dict[str, int] = {}  # key -> the first record holding it
    for i, record_keys in enumerate(keys):
        for key in record_keys:
            a, b = root(i), root(first.setdefault(key, i))
            parent[max(a, b)] = min(a, b)  # a group's root is its first record
    groups: dict[int, list[int]] = {}
    for i in range(len(keys)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def prompt_keys(record: dict, fmt: str) -> list[str]:
    """What a record asks first, and each exchange (question and answer) it trains on.

    Training targets every assistant turn, so a conversation [u1, a1, u2, a2] teaches a1 and
    a2: keyed by u1, by (u1, a1) and by (u2, a2), it lands in the same part as a record asking
    u1 or holding either exchange. Exchanges, not bare questions: a follow-up such as "Why?"
    asked in many conversations does not join them all. A single-turn record's first key is
    its whole prompt (system and user messages); its exchange adds no link of its own.
    """
    if fmt == "text":
        return [_text(record, "text")]
    messages = to_messages(record, fmt)
    first = next(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0), len(messages)
    )
    keys = [_joined(messages[:first])]
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            keys.append(_joined(messages[i - 1 : i + 1]))
    return keys


def _joined(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def pack(examples: list[dict], block_size: int) -> list[dict]:
    """Whole examples put together in rows of at most `block_size` tokens, best-fit
    decreasing (TRL's `bfd`): each, longest first, into the fullest row it fits.

    Fewer padding tokens per step, and no example cut in two (its tail would train without
    its question). Each token keeps its position in its own example (`position_ids`), which
    keeps examples in one row from attending to each other: the collator sends no attention
    mask with them, and transformers then masks attention block-diagonally wherever the
    positions restart. An example's first label is dropped, as it is unpacked (nothing in its
    example comes before it). Examples are at most `block_size` long, as `encode` cuts them.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # each row's examples, by index
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the fullest fit is a bisect
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > block_size:
            raise ValueError(f"an example of {size} tokens cannot fit rows of {block_size}")
        at = bisect.bisect_left(room, (size, -1))
        if at == len(room):
            rows.append([])
            free, row = block_size, len(rows) - 1
        else:
            free, row = room.pop(at)
        rows[row].append(i)
        bisect.insort(room, (free - size, row))
    return [_row([examples[i] for i in sorted(row)]) for row in rows]


def _row(examples: list[dict]) -> dict:
    """Examples side by side, each with its own positions and no label on its first token."""
    return {
        "input_ids": [t for e in examples for t in e["input_ids"]],
        "labels": [
            IGNORE_INDEX if p == 0 else t for e in examples for p, t in enumerate(e["labels"])
        ],
        "position_ids": [p for e in examples for p in range(len(e["input_ids"]))],
    }


def has_target(labels: list[int]) -> bool:
    """Whether a row trains on anything: labels[0] is never predicted (no token before it)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


@dataclass
class SplitData:
    """Raw records of each split and the format they are in."""

    format: str
    train: object  # datasets.Dataset
    validation: object
    test: object


def load_splits(data_config) -> SplitData:
    """The raw train/validation/test records of a config's data, split as in training.

    The gates read the test split through this same function, so it stays held out.
    """
    records = load_records(data_config.path)
    fmt = data_config.format
    if fmt == "auto":
        fmt = detect_format(records.column_names, data_config.path)
    else:
        fmt = check_format(fmt, records.column_names, data_config.path)
    split = data_config.split
    keys = _keys(records, fmt, data_config.path)
    indices = split_indices(keys, split.validation, split.test, split.seed)
    return SplitData(
        fmt, *(records.select(indices[name]) for name in ("train", "validation", "test"))
    )


def _keys(records, fmt: str, path: Path) -> list[list[str]]:
    """Each record's `prompt_keys`; a record that is not `fmt` is a ConfigError naming it."""
    keys = []
    for i, record in enumerate(records):
        try:
            keys.append(prompt_keys(record, fmt))
        except ValueError as error:
            raise ConfigError(f"data.path: {path.name} record {i + 1} {error}") from None
    return keys


def tokenize_split(records, fmt: str, tokenizer, data_config, pack_rows: bool):
    """Tokenized examples of one split as a `datasets.Dataset` of input_ids and labels."""
    from datasets import Dataset

    examples = [encode(r, fmt, tokenizer, data_config.max_seq_length) for r in records]
    examples = [e for e in examples if has_target(e["labels"])]
    if pack_rows:
        examples = pack(examples, data_config.max_seq_length)
    if not examples:
        raise ConfigError(f"data.path: {data_config.path.name} gives no example with an answer")
    return Dataset.from_list(examples)

"""Data shapes, answer-only labels, deterministic splits, packing, and the committed demo data."""

from __future__ import annotations

import json
import os
import re

import pytest

from registry.errors import ConfigError
from tests.helpers import PROJECT
from train.config import load_config
from train.data import (
    IGNORE_INDEX,
    detect_format,
    encode,
    load_records,
    load_splits,
    pack,
    prompt_keys,
    split_indices,
    to_messages,
    tokenize_split,
)
from train.demo_data import DEMO_DATA, render

ALPACA = {"instruction": "Name a colour.", "input": "Pick a warm one.", "output": "Red."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
}


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_alpaca_labels_cover_exactly_the_answer(tokenizer):
    example = encode(ALPACA, "alpaca", tokenizer, 256)
    messages = to_messages(ALPACA, "alpaca")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert _labelled_text(tokenizer, example) == "Red.<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert "Name a colour.\n\nPick a warm one." in tokenizer.decode(example["input_ids"])


def test_chat_labels_every_assistant_turn_and_no_user_turn(tokenizer):
    example = encode(CHAT, "chat", tokenizer, 512)
    assert _labelled_text(tokenizer, example) == "Hello.<|im_end|>\nLima.<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nBe brief.")


def test_sharegpt_conversations_map_to_roles():
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert to_messages(record, "chat") == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_text_is_trained_on_every_token_and_ends_with_eos(tokenizer):
    example = encode({"text": "Plain words here."}, "text", tokenizer, 64)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_examples_are_cut_at_max_length(tokenizer):
    long = {**ALPACA, "output": "word " * 500}
    example = encode(long, "alpaca", tokenizer, 40)
    assert len(example["input_ids"]) == len(example["labels"]) == 40


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "id"], "alpaca"),
        (["messages", "context"], "chat"),
        (["conversations"], "chat"),
        (["text"], "text"),
    ],
)
def test_format_is_detected_from_columns(columns, expected, tmp_path):
    assert detect_format(columns, tmp_path / "d.jsonl") == expected


def test_unknown_shape_is_refused_with_its_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"has columns \['answer', 'question'\]"):
        detect_format(["question", "answer"], tmp_path / "d.jsonl")


KEYS = [f"question {i}" for i in range(50)]


def test_records_asking_the_same_question_share_one_split_part():
    keys = [f"q{i % 20}" for i in range(60)]  # every question three times
    parts = split_indices(keys, 0.1, 0.2, seed=0)
    for name, part in parts.items():
        others = {keys[i] for other, p in parts.items() if other != name for i in p}
        assert not {keys[i] for i in part} & others
    assert [len(parts[name]) for name in ("validation", "test")] == [3 * 2, 3 * 4]


@pytest.mark.parametrize(("validation", "test"), [(0.1, 0.1), (5, 7), (0.25, 3)])
def test_split_is_deterministic_disjoint_and_complete(validation, test):
    first = split_indices(KEYS, validation, test, seed=3)
    assert first == split_indices(KEYS, validation, test, seed=3)
    assert first != split_indices(KEYS, validation, test, seed=4)
    parts = [set(first[name]) for name in ("train", "validation", "test")]
    assert set.union(*parts) == set(range(50))
    assert sum(len(p) for p in parts) == 50
    assert len(first["validation"]) == (validation if validation >= 1 else round(validation * 50))
    assert len(first["test"]) == (test if test >= 1 else round(test * 50))


@pytest.mark.parametrize(("validation", "test"), [(30, 30), (0.01, 0.1), (0.5, 0.5)])
def test_split_that_leaves_a_part_empty_is_refused(validation, test):
    with pytest.raises(ConfigError, match=r"data\.split"):
        split_indices(KEYS[:20], validation, test, seed=0)


def _examples(*sizes: int) -> list[dict]:
    """Examples whose token ids say (example, position): 100·i + p; two prompt tokens each."""
    return [
        {
            "input_ids": [100 * i + p for p in range(n)],
            "labels": [IGNORE_INDEX] * 2 + [100 * i + p for p in range(2, n)],
        }
        for i, n in enumerate(sizes)
    ]


def test_pack_puts_whole_examples_best_fit_decreasing_each_with_its_own_positions():
    examples = _examples(5, 9, 3, 4, 2)
    rows = pack(examples, 10)
    # longest first, each into the fullest row it fits: 9 | 5, 4 | 3, 2 (2 does not fit the 1s)
    assert [sorted({t // 100 for t in r["input_ids"]}) for r in rows] == [[1], [0, 3], [2, 4]]
    for row in rows:
        assert len(row["input_ids"]) <= 10
        assert row["position_ids"] == [t % 100 for t in row["input_ids"]]
        assert row["labels"] == [
            IGNORE_INDEX if t % 100 < 2 else t for t in row["input_ids"]
        ]  # the prompt's, and each example's first label (already the prompt's here)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(
        t for e in examples for t in e["input_ids"]
    )
    assert pack([], 6) == []


def test_pack_drops_each_examples_first_label_which_nothing_in_its_example_predicts():
    text = [{"input_ids": [1, 7, 8, 2], "labels": [1, 7, 8, 2]} for _ in range(2)]
    rows = pack(text, 16)
    assert rows[0]["labels"] == [IGNORE_INDEX, 7, 8, 2, IGNORE_INDEX, 7, 8, 2]


def test_pack_refuses_an_example_longer_than_its_rows():
    with pytest.raises(ValueError, match="an example of 9 tokens cannot fit rows of 8"):
        pack(_examples(3, 9), 8)


def test_a_text_record_of_one_token_has_nothing_to_predict_and_is_dropped(tokenizer, tmp_path):
    from types import SimpleNamespace

    data = SimpleNamespace(max_seq_length=64, path=tmp_path / "d.jsonl")
    records = [{"text": ""}, {"text": "Plain words here."}]
    for packing in (False, True):
        rows = tokenize_split(records, "text", tokenizer, data, pack_rows=packing)
        assert len(rows) == 1 and len(rows[0]["labels"]) > 1
    with pytest.raises(ConfigError, match="gives no example with an answer"):
        tokenize_split(records[:1], "text", tokenizer, data, pack_rows=False)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_load_in_each_format(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame(
        [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    )
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    records = load_records(path)
    assert records["output"] == ["a0", "a1", "a2", "a3"]


@pytest.mark.parametrize("file_name", sorted(DEMO_DATA))
def test_committed_demo_data_is_what_the_builder_writes(file_name):
    committed = (PROJECT / "configs/data" / file_name).read_text(encoding="utf-8")
    assert committed == render(DEMO_DATA[file_name]())


@pytest.mark.parametrize(
    "config", sorted(PROJECT.glob("configs/train/*.yaml")), ids=lambda p: p.stem
)
def test_demo_test_split_is_held_out_from_training(config):
    splits = load_splits(load_config(config).data)
    ids = {name: set(getattr(splits, name)["id"]) for name in ("train", "validation", "test")}
    assert ids["test"] and ids["validation"]
    assert not ids["test"] & ids["train"]
    assert not ids["validation"] & ids["train"]
    assert not ids["test"] & ids["validation"]
    records = load_records(load_config(config).data.path)
    assert len(set(records["id"])) == len(records) == sum(len(v) for v in ids.values())


@pytest.mark.parametrize(
    ("fmt", "needs"), [("chat", "messages or conversations"), ("text", "text")]
)
def test_a_format_whose_columns_the_data_lacks_is_refused_naming_data_format(fmt, needs):
    config = PROJECT / "configs/train/construction-faq_smollm2-135m_qlora_cpu.yaml"
    with pytest.raises(ConfigError, match=rf"data\.format: {fmt} needs the columns {needs}; ") as e:
        load_splits(load_config(config, [f"data.format={fmt}"]).data)
    assert "construction-faq.jsonl has [" in str(e.value) and "'instruction'" in str(e.value)


def _turns(*texts: str) -> dict:
    roles = ["user", "assistant"] * len(texts)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)]}


def _leaks(records: list[dict], parts: dict[str, list[int]]) -> set:
    """The (question, answer) turns of test records that a train record also targets."""

    def exchanges(i):
        messages = to_messages(records[i], "chat")
        return {
            (messages[j - 1]["content"], m["content"])
            for j, m in enumerate(messages)
            if m["role"] == "assistant"
        }

    trained = set().union(*map(exchanges, parts["train"]))
    return set().union(*map(exchanges, parts["test"])) & trained


def test_a_multi_turn_record_shares_a_split_part_with_its_first_turn_asked_alone():
    # Each question once alone and once opening a two-turn chat: training targets both answers
    # of the chat, so the chat in train and the single question in test would leak its answer.
    records = []
    for i in range(40):
        chat = _turns(f"What is {i}?", f"{i}.", "Why?", f"Because {i}.")
        records += [_turns(f"What is {i}?", f"{i}."), chat]
    parts = split_indices([prompt_keys(r, "chat") for r in records], 0.1, 0.1, seed=0)
    assert len(parts["test"]) == 2 * 4 and not _leaks(records, parts)  # "Why?" joins none


def test_an_exchange_repeated_as_a_later_turn_of_another_chat_shares_its_part():
    # Question i alone, and as the second turn of a chat opening with question i + 1: the chats
    # chain every record into one group, so no split may leave a part empty...
    chained = [_turns(f"Q{i}?", f"A{i}.") for i in range(30)]
    chained += [_turns(f"Q{i + 1}?", f"A{i + 1}.", f"Q{i}?", f"A{i}.") for i in range(29)]
    with pytest.raises(ConfigError, match=r"of 1 distinct prompts \(59 records;"):
        split_indices([prompt_keys(r, "chat") for r in chained], 0.1, 0.1, seed=0)
    # ...and pairs (2k + 1 opening, 2k as its second turn) make 15 groups of two questions.
    records = [_turns(f"Q{i}?", f"A{i}.") for i in range(30)]
    records += [_turns(f"Q{i + 1}?", f"A{i + 1}.", f"Q{i}?", f"A{i}.") for i in range(0, 30, 2)]
    parts = split_indices([prompt_keys(r, "chat") for r in records], 3, 3, seed=0)
    assert len(parts["test"]) == 3 * 3 and not _leaks(records, parts)
    first_turn_only = [prompt_keys(r, "chat")[0] for r in records]  # as keyed before
    assert _leaks(records, split_indices(first_turn_only, 3, 3, seed=0))


def test_prompt_keys_are_the_first_prompt_and_each_exchange():
    system = {"role": "system", "content": "Be brief."}
    record = {"messages": [system, *_turns("u1", "a1", "u2", "a2", "u3")["messages"]]}
    assert prompt_keys(record, "chat") == [
        "system: Be brief.\nuser: u1",
        "user: u1\nassistant: a1",
        "user: u2\nassistant: a2",
    ]
    assert prompt_keys({"messages": [system]}, "chat") == ["system: Be brief."]
    assert prompt_keys({"text": "plain"}, "text") == ["plain"]


# Digests of the record ids in each part of the shipped configs' splits, as split before
# multi-turn records were keyed by their first turn: single-turn data must split the same.
SHIPPED_SPLITS = {
    "construction-faq_llama3-8b_qlora_gpu": (
        "a70bb0266fd6666a",
        "38883210bfa95e0e",
        "b940455d4c7e8d2d",
    ),
    "construction-faq_smollm2-135m_qlora_cpu": (
        "a70bb0266fd6666a",
        "38883210bfa95e0e",
        "b940455d4c7e8d2d",
    ),
    "country-facts_smollm2-135m_qlora_cpu": (
        "989e22638281738f",
        "f362387851dee5a1",
        "58bbce116590fd05",
    ),
}


@pytest.mark.parametrize("config", sorted(SHIPPED_SPLITS))
def test_shipped_data_splits_exactly_as_before(config):
    import hashlib

    splits = load_splits(load_config(PROJECT / f"configs/train/{config}.yaml").data)
    digests = tuple(
        hashlib.sha256(",".join(getattr(splits, part)["id"]).encode()).hexdigest()[:16]
        for part in ("train", "validation", "test")
    )
    assert digests == SHIPPED_SPLITS[config]


def test_a_chat_opening_with_the_assistant_trains_on_the_answers_after_it(tokenizer):
    record = {"messages": [{"role": "assistant", "content": "Welcome!"}, *CHAT["messages"][1:]]}
    example = encode(record, "chat", tokenizer, max_length=512)
    assert _labelled_text(tokenizer, example).count("<|im_end|>") == 2  # Hello. and Lima.
    assert "Welcome" not in _labelled_text(tokenizer, example)
    assert "Welcome" in tokenizer.decode(example["input_ids"])
    # Its first key is what the conversation opens with, not an empty prompt every such
    # record would share (one split part for all of them).
    assert prompt_keys(record, "chat")[0] == "assistant: Welcome!\nuser: Hi"


def test_a_csv_column_of_numbers_is_read_as_text(tmp_path, tokenizer):
    path = tmp_path / "sums.csv"
    path.write_text("instruction,output\n" + "".join(f"{i} + {i}?,{2 * i}\n" for i in range(9)))
    records = load_records(path)
    assert to_messages(records[3], "alpaca")[1] == {"role": "assistant", "content": "6"}
    assert "6<|im_end|>" in _labelled_text(tokenizer, encode(records[3], "alpaca", tokenizer, 64))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "q", "output": null}', "record 3 'output' is missing"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "record 3 role 'bot' is none of"),
        ('{"messages": []}', "record 3 has no messages"),
        ('{"messages": null}', "record 3 has no messages"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}', "record 3 from 'robot' is none"),
        ('{"messages": [{"role": "user", "content": ["a"]}]}', "record 3 'content' is not text"),
    ],
)
def test_a_malformed_record_is_refused_naming_its_number(tmp_path, line, message):
    good = CHAT if "instruction" not in line else ALPACA
    if "conversations" in line:
        good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(good), line]) + "\n")
    config = PROJECT / "configs/train/construction-faq_smollm2-135m_qlora_cpu.yaml"
    with pytest.raises(ConfigError, match=rf"data\.path: data\.jsonl {re.escape(message)}"):
        load_splits(load_config(config, [f"data.path={path}", "data.format=auto"]).data)


def test_a_file_rewritten_with_its_old_modification_time_is_read_anew(tmp_path):
    """`datasets` keys its cache of a local file by path and time: the old records came back
    under the new content's data hash."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "2 + 2?", "output": "4"}) + "\n")
    stat = path.stat()
    assert load_records(path)[0]["output"] == "4"
    path.write_text(json.dumps({"instruction": "2 + 3?", "output": "5"}) + "\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` leaves it
    assert load_records(path)[0]["output"] == "5"


def test_packed_rows_are_padded_as_segments_of_their_own_and_sent_without_an_attention_mask(
    tokenizer,
):
    from train.collate import RowCollator, not_padding

    collate = RowCollator(tokenizer)
    pad = tokenizer.pad_token_id
    packed = [
        {"input_ids": [5, 6, 7, pad], "labels": [-100, 6, -100, pad], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [8, 4], "labels": [-100, 4], "position_ids": [0, 1]},
    ]
    batch = collate(packed)
    assert batch.keys() == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad], [8, 4, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, -100, pad], [-100, 4, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    # a real end of turn (pad is EOS here) counts; the padding does not
    assert not_padding(batch).tolist() == [[True] * 4, [True, True, False, False]]
    plain = collate([{k: r[k] for k in ("input_ids", "labels")} for r in packed])
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]

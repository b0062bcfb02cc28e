"""Data preparation: loading, formats, exact label masks, truncation, splitting and the report."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from lorakit.data import (
    IGNORE_INDEX,
    count_rows,
    detect_format,
    encode,
    encode_prompt,
    load_source,
    prepare_data,
    split_indices,
    to_messages,
)
from lorakit.errors import ConfigError, DataError
from lorakit.templates import get_template

HELLO = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello world"}]
HELLO_INPUT = [
    {"role": "user", "content": "Say hello.", "input": "the fox"},
    {"role": "assistant", "content": "hello world"},
]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "world"},
]
LONG_REPLY = "The quick brown fox jumps over the lazy dog. " * 4


def trained_text(tokenizer: Any, labels: list[int]) -> str:
    return tokenizer.decode([token for token in labels if token != IGNORE_INDEX])


def trained_runs(tokenizer: Any, labels: list[int]) -> list[str]:
    runs: list[list[int]] = []
    for i, token in enumerate(labels):
        if token == IGNORE_INDEX:
            continue
        if i == 0 or labels[i - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def alpaca_rows(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Say {i}.", "output": f"hello {i}"} for i in range(n)]


# --- loading ----------------------------------------------------------------------------------------------


def test_load_source_reads_jsonl_json_csv_lists_and_datasets(tmp_path):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\na,,b\nc,d,e\n")
    for source in ("d.jsonl", "d.json", "lines.json", "d.csv"):
        assert load_source(tmp_path / source).to_list() == rows
    assert load_source(str(tmp_path / "d.jsonl")).to_list() == rows
    dataset = load_source(rows)
    assert dataset.to_list() == rows
    assert load_source(dataset) is dataset


def test_load_source_fills_fields_missing_in_some_rows():
    dataset = load_source(
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    )
    assert dataset.column_names == ["instruction", "output", "input"]
    assert dataset[0]["input"] is None


def test_load_source_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"Data file .*missing\.jsonl does not exist .*Check the path"):
        load_source(tmp_path / "missing.jsonl")
    (tmp_path / "d.xlsx").write_text("")
    with pytest.raises(
        DataError, match=r"d\.xlsx: unknown file type '\.xlsx'. Use a \.json, \.jsonl, \.csv, \.tsv"
    ):
        load_source(tmp_path / "d.xlsx")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON \(Expecting value\)"):
        load_source(bad)
    (tmp_path / "list.jsonl").write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: expected a JSON object, got list"):
        load_source(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows"):
        load_source(tmp_path / "empty.jsonl")
    (tmp_path / "wide.csv").write_text("instruction,output\na,b,c\n")
    with pytest.raises(DataError, match=r"wide\.csv, line 2: more cells than the 2 header columns"):
        load_source(tmp_path / "wide.csv")
    with pytest.raises(DataError, match="my rows, row 1: expected a dict of fields, got str"):
        load_source([{"instruction": "a"}, "b"], name="my rows")
    with pytest.raises(DataError, match="Cannot read a dataset from int"):
        load_source(3)
    with pytest.raises(DataError, match="the list of rows has no rows"):
        load_source([])


def test_load_source_rejects_columns_of_mixed_types():
    with pytest.raises(DataError, match="Give each field the same type in every row"):
        load_source([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": {"x": 1}}])


# --- formats ----------------------------------------------------------------------------------------------


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["messages", "id"]) == "messages"
    with pytest.raises(
        DataError, match=r"columns \['question', 'answer'\]. Accepted formats: alpaca: instruction"
    ):
        detect_format(["question", "answer"])


def test_to_messages_converts_and_strips():
    row = {"system": " Be brief. ", "instruction": " Say hello.\n", "input": " the fox ", "output": " hello "}
    assert to_messages(row, "alpaca", row_index=0, source_name="s") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello.", "input": "the fox"},
        {"role": "assistant", "content": "hello"},
    ]
    row = {"instruction": "Add.", "input": "  ", "output": 42}
    assert to_messages(row, "alpaca", row_index=0, source_name="s") == [
        {"role": "user", "content": "Add."},
        {"role": "assistant", "content": "42"},
    ]
    assert to_messages(
        {"prompt": "Hi", "completion": " hello"}, "prompt_completion", row_index=0, source_name="s"
    ) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "hello"},
    ]
    conversational = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [CHAT[1]]}
    assert to_messages(conversational, "prompt_completion", row_index=0, source_name="s") == CHAT
    assert to_messages({"messages": MULTI_TURN}, "messages", row_index=0, source_name="s") == MULTI_TURN


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"instruction": "a"}, "alpaca", r"train\.jsonl, row 7: missing field 'output' \(fields present"),
        (
            {"instruction": ["a"], "output": "b"},
            "alpaca",
            "row 7: field 'instruction' must be text, got list",
        ),
        ({"prompt": "a", "completion": None}, "prompt_completion", "row 7: missing field 'completion'"),
        ({"messages": "hi"}, "messages", "row 7: field 'messages' must be a list of {role, content} dicts"),
        (
            {"messages": [{"role": "human", "content": "hi"}]},
            "messages",
            r"row 7, messages\[0\]: unknown role 'human'; use 'system', 'user' or 'assistant'",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            "messages",
            "row 7, field 'messages': the conversation must start with a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "messages",
            "row 7, field 'messages': the conversation has no assistant turn",
        ),
        (
            {"messages": [CHAT[0], {"role": "system", "content": "x"}, CHAT[1]]},
            "messages",
            r"messages\[1\]: a system message may only come first",
        ),
        ({"messages": [{"role": "user"}, CHAT[1]]}, "messages", r"messages\[0\]: missing field 'content'"),
    ],
)
def test_to_messages_errors_name_source_row_and_field(row, fmt, message):
    with pytest.raises(DataError, match=message):
        to_messages(row, fmt, row_index=7, source_name="train.jsonl")


# --- exact labels -----------------------------------------------------------------------------------------


def test_alpaca_labels_without_input(tiny_tokenizer):
    row = encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=512)
    assert row.labels == [IGNORE_INDEX] * 53 + [362, 369, 320, 375, 368, 2]
    assert row.input_ids[0] == tiny_tokenizer.bos_token_id and row.input_ids.count(1) == 1
    assert row.input_ids[53:] == [362, 369, 320, 375, 368, 2]
    assert tiny_tokenizer.decode(row.input_ids[53:]) == "hello world</s>"
    assert tiny_tokenizer.decode(row.input_ids[:53]).endswith(
        "### Instruction:\nSay hello.\n\n### Response:\n"
    )
    assert (row.truncated, row.n_prompt_tokens, row.n_trained_tokens) == (False, 53, 6)


def test_alpaca_labels_with_input(tiny_tokenizer):
    row = encode(HELLO_INPUT, get_template("alpaca"), tiny_tokenizer, max_length=512)
    assert row.labels == [IGNORE_INDEX] * 87 + [362, 369, 320, 375, 368, 2]
    assert tiny_tokenizer.decode(row.input_ids[:87]).endswith("### Input:\nthe fox\n\n### Response:\n")
    assert trained_text(tiny_tokenizer, row.labels) == "hello world</s>"


def test_chatml_labels(tiny_tokenizer):
    row = encode(CHAT, get_template("chatml"), tiny_tokenizer, max_length=512)
    assert row.input_ids == [1, 3, 389, 203, 44, 77, 4, 203, 3, 304, 87, 268, 387, 88, 203, 362, 369, 4, 203]
    assert row.labels == [IGNORE_INDEX] * 15 + [362, 369, 4, IGNORE_INDEX]
    assert trained_text(tiny_tokenizer, row.labels) == "hello<|im_end|>"
    assert (
        tiny_tokenizer.decode(row.input_ids[:15])
        == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_eos_stays_trained_when_pad_is_eos(tiny_tokenizer):
    padded_tokenizer = copy.deepcopy(tiny_tokenizer)
    padded_tokenizer.pad_token = padded_tokenizer.eos_token  # what training does for a tokenizer without pad
    row = encode(HELLO, get_template("alpaca"), padded_tokenizer, max_length=512)
    assert row == encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=512)
    assert row.labels[-1] == padded_tokenizer.pad_token_id == padded_tokenizer.eos_token_id
    # Padding (as a pad-only collator does it) leaves the real EOS label in place.
    labels = row.labels + [IGNORE_INDEX] * 3
    assert labels[len(row.labels) - 1] == padded_tokenizer.eos_token_id


def test_train_on_inputs_labels_every_token(tiny_tokenizer):
    row = encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=512, train_on_inputs=True)
    assert row.labels == row.input_ids
    assert row.n_trained_tokens == len(row.input_ids) == 59


def test_multi_turn_trains_every_reply_and_masks_the_rest(tiny_tokenizer):
    expected = {
        "alpaca": ["hello</s>", "world</s>"],
        "chatml": ["hello<|im_end|>", "world<|im_end|>"],
        "llama2": [" hello </s>", " world </s>"],
        "model": ["hello<|im_end|>", "world<|im_end|>"],
    }
    for name, replies in expected.items():
        row = encode(MULTI_TURN, get_template(name), tiny_tokenizer, max_length=512)
        assert trained_runs(tiny_tokenizer, row.labels) == replies, name
        masked = tiny_tokenizer.decode(
            [t for t, label in zip(row.input_ids, row.labels, strict=True) if label == IGNORE_INDEX]
        )
        assert "Be brief." in masked and "Hi" in masked and "And?" in masked
        assert "hello" not in masked and "world" not in masked


def test_model_template_gives_the_chatml_label_mask(tiny_tokenizer):
    for messages in (CHAT, MULTI_TURN):
        assert encode(messages, get_template("model"), tiny_tokenizer, max_length=512) == encode(
            messages, get_template("chatml"), tiny_tokenizer, max_length=512
        )


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama2", "model"])
@pytest.mark.parametrize("messages", [HELLO, HELLO_INPUT, MULTI_TURN], ids=["plain", "input", "multi-turn"])
def test_encode_prompt_is_the_prompt_part_of_the_training_row(tiny_tokenizer, name, messages):
    template = get_template(name)
    prompt = encode_prompt(messages[:-1], template, tiny_tokenizer)
    row = encode(messages, template, tiny_tokenizer, max_length=512)
    assert row.input_ids[: len(prompt)] == prompt
    assert row.labels[len(prompt) - 1] == IGNORE_INDEX and row.labels[len(prompt)] != IGNORE_INDEX
    assert prompt.count(tiny_tokenizer.bos_token_id) == (
        2 if name == "llama2" and messages is MULTI_TURN else 1
    )


def test_llama2_does_not_double_bos(tiny_tokenizer):
    row = encode(CHAT, get_template("llama2"), tiny_tokenizer, max_length=512)
    assert row.input_ids[:2] != [1, 1] and row.input_ids[0] == 1
    assert trained_text(tiny_tokenizer, row.labels) == " hello </s>"


# --- truncation -------------------------------------------------------------------------------------------


def test_long_prompt_is_cut_from_the_left_keeping_bos_and_reply(tiny_tokenizer):
    full = encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=512)
    row = encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=20)
    assert len(row.input_ids) == 20 and row.truncated and not row.reply_cut
    assert row.input_ids == [1] + full.input_ids[-19:]
    assert row.labels == [IGNORE_INDEX] * 14 + [362, 369, 320, 375, 368, 2]
    assert tiny_tokenizer.decode(row.input_ids) == "<s>Say hello.\n\n### Response:\nhello world</s>"


def test_too_long_reply_keeps_the_prompt_and_cuts_the_end(tiny_tokenizer):
    messages = [CHAT[0], {"role": "assistant", "content": LONG_REPLY}]
    row = encode(messages, get_template("chatml"), tiny_tokenizer, max_length=24)
    assert len(row.input_ids) == 24 and row.truncated and row.reply_cut
    assert row.labels[:15] == [IGNORE_INDEX] * 15 and IGNORE_INDEX not in row.labels[15:]
    assert LONG_REPLY.startswith(trained_text(tiny_tokenizer, row.labels))
    assert tiny_tokenizer.eos_token_id not in row.labels and 4 not in row.labels  # no end of turn learned


def test_no_trained_token_left_is_flagged(tiny_tokenizer):
    row = encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=4)
    assert row.input_ids == [1, 331, 290, 291] and row.labels == [IGNORE_INDEX] * 4
    assert row.truncated and not row.has_trainable_tokens


def test_encode_rejects_a_bad_max_length(tiny_tokenizer):
    with pytest.raises(ConfigError, match="`max_length` must be a positive integer, got 0"):
        encode(HELLO, get_template("alpaca"), tiny_tokenizer, max_length=0)


# --- prepare_data -----------------------------------------------------------------------------------------


def test_prepare_data_counts_everything(tiny_tokenizer):
    rows = alpaca_rows(6) + [
        {"instruction": "Empty reply.", "output": "   "},
        {"instruction": "Long prompt. " * 30, "output": "hello"},
        {"instruction": "Long reply.", "output": LONG_REPLY},
        {"instruction": "The quick brown fox jumps over the lazy dog. " * 30, "output": LONG_REPLY},
    ]
    prepared = prepare_data(rows, tokenizer=tiny_tokenizer, template="alpaca", val_split=0, max_length=80)
    report = prepared.report
    assert prepared.val is None
    assert prepared.train.column_names == ["input_ids", "labels"]
    expected = {
        "source": "the list of rows",
        "format": "alpaca",
        "max_length": 80,
        "rows_loaded": 10,
        "dropped_empty_response": 1,
        "truncated": 2,
        "truncated_response": 1,
        "dropped_no_trainable_tokens": 1,
        "train_rows": 8,
        "val_rows": 0,
        "train_tokens": sum(len(ids) for ids in prepared.train["input_ids"]),
        "trained_tokens": sum(sum(t != IGNORE_INDEX for t in labels) for labels in prepared.train["labels"]),
        "dropped": {"empty_response": 1, "no_trainable_tokens": 1},
        "assistant_turns": 8,
        "turns_ending_with_eot": 7,  # the reply cut at max_length lost its EOS ...
        "turns_missing_eot": 0,  # ... and is not counted as missing it
        "stripped_rows": 4,  # "   " and the three texts ending in a space
    }
    assert {key: report.to_dict()[key] for key in expected} == expected
    assert all(len(ids) <= 80 for ids in prepared.train["input_ids"])
    first = prepared.train[0]
    assert first == {
        "input_ids": encode(
            to_messages(rows[0], "alpaca", row_index=0, source_name="x"),
            get_template("alpaca"),
            tiny_tokenizer,
            max_length=80,
        ).input_ids,
        "labels": encode(
            to_messages(rows[0], "alpaca", row_index=0, source_name="x"),
            get_template("alpaca"),
            tiny_tokenizer,
            max_length=80,
        ).labels,
    }
    summary = report.summary()
    assert "8 train / 0 val rows (alpaca, 10 loaded from the list of rows)" in summary
    assert "2 rows cut to max_length=80 (1 lost the end of their reply)" in summary
    assert "1 rows dropped: empty reply" in summary and "1 rows dropped: no reply token left" in summary


def test_split_is_deterministic_and_happens_before_tokenizing(tiny_tokenizer):
    rows = alpaca_rows(20)
    a = prepare_data(rows, tokenizer=tiny_tokenizer, template="chatml", val_split=0.25, seed=1)
    b = prepare_data(rows, tokenizer=tiny_tokenizer, template="chatml", val_split=0.25, seed=1)
    c = prepare_data(rows, tokenizer=tiny_tokenizer, template="chatml", val_split=0.25, seed=2)
    assert (a.report.train_rows, a.report.val_rows) == (15, 5)
    assert a.train.to_list() == b.train.to_list() and a.val.to_list() == b.val.to_list()
    assert a.val.to_list() != c.val.to_list()
    train_idx, val_idx = split_indices(20, 0.25, seed=1)
    assert sorted(train_idx + val_idx) == list(range(20)) and len(val_idx) == 5
    val_texts = [tiny_tokenizer.decode(ids) for ids in a.val["input_ids"]]
    assert all(f"Say {i}." in text for i, text in zip(val_idx, val_texts, strict=True))
    assert count_rows(rows, val_split=0.25, seed=1) == (15, 5)


def test_split_edge_cases():
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1  # a requested split gets at least one row
    assert split_indices(1, 0.5, seed=0) == ([0], [])  # ... and training keeps at least one
    with pytest.raises(ConfigError, match=r"`val_split` must be in \[0, 1\), got 1.0"):
        split_indices(5, 1.0, seed=0)


def test_val_source_overrides_val_split(tmp_path, tiny_tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in alpaca_rows(4)))
    val = [{"messages": CHAT}, {"messages": [CHAT[0], {"role": "assistant", "content": ""}]}]
    prepared = prepare_data(train, tokenizer=tiny_tokenizer, template="chatml", val_split=0.5, val_source=val)
    assert (prepared.report.train_rows, prepared.report.val_rows) == (4, 1)
    assert prepared.report.rows_loaded == 6 and prepared.report.dropped_empty_response == 1
    assert prepared.report.source == str(train)
    assert prepared.val.to_list() == [
        {
            "input_ids": (
                row := encode(CHAT, get_template("chatml"), tiny_tokenizer, max_length=1024)
            ).input_ids,
            "labels": row.labels,
        }
    ]
    assert count_rows(train, val_split=0.5, seed=0, val_source=val) == (4, 1)


def test_prepare_data_with_nothing_to_train_on(tiny_tokenizer):
    rows = [{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}]
    with pytest.raises(
        DataError, match="No training rows left from the list of rows: 2 loaded, 2 with an empty reply"
    ):
        prepare_data(rows, tokenizer=tiny_tokenizer, template="alpaca")
    with pytest.raises(DataError, match="0 with an empty reply, 2 with no reply token within max_length=3"):
        prepare_data(alpaca_rows(2), tokenizer=tiny_tokenizer, template="alpaca", val_split=0, max_length=3)


def test_prepare_data_errors_surface_before_tokenizing(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"columns \['question', 'answer'\]"):
        prepare_data(path, tokenizer=tiny_tokenizer, template="alpaca")
    with pytest.raises(ConfigError, match="Unknown template 'nope'"):
        prepare_data(alpaca_rows(2), tokenizer=tiny_tokenizer, template="nope")
    with pytest.raises(DataError, match=r"d\.jsonl, line 1 \(row 0\), messages\[0\]: unknown role 'bot'"):
        path.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
        count_rows(path, val_split=0, seed=0)


def test_prepare_data_accepts_a_dataset_and_train_on_inputs(tiny_tokenizer):
    dataset = load_source([{"prompt": "Hi", "completion": "hello"}] * 3)
    prepared = prepare_data(
        dataset, tokenizer=tiny_tokenizer, template="chatml", val_split=0, train_on_inputs=True, dedup=False
    )
    assert prepared.report.format == "prompt_completion"
    assert prepared.train["labels"] == prepared.train["input_ids"]
    assert prepared.report.trained_tokens == prepared.report.train_tokens == 3 * 19

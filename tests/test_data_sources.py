"""Sources, formats, cleaning, bad input, overflow policies, the cache and num_proc."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lorakit.data import IGNORE_INDEX, count_rows, encode, prepare_data, read_source, to_messages
from lorakit.errors import ConfigError, DataError
from lorakit.templates import Template, get_template

ROWS = [
    {"instruction": "Say one.", "input": "", "output": "one"},
    {"instruction": "Say two.", "input": "x", "output": "two"},
]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]


def prep(source: Any, tokenizer: Any, **options: Any):
    options.setdefault("template", "chatml")
    options.setdefault("val_split", 0)
    options.setdefault("cache", False)
    return prepare_data(source, tokenizer=tokenizer, **options)


def texts(tokenizer: Any, prepared: Any) -> list[str]:
    return [tokenizer.decode(ids) for ids in prepared.train["input_ids"]]


# --- sources ----------------------------------------------------------------------------------------------


def test_tabular_files_and_in_memory_tables(tmp_path):
    import datasets
    import pandas as pd

    (tmp_path / "d.tsv").write_text("instruction\tinput\toutput\nSay one.\t\tone\nSay two.\tx\ttwo\n")
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    sources = {
        "tsv": tmp_path / "d.tsv",
        "parquet": str(tmp_path / "d.parquet"),
        "save_to_disk": tmp_path / "saved",
        "save_to_disk dict": str(tmp_path / "saved_dict"),
        "Dataset": dataset,
        "DatasetDict": datasets.DatasetDict({"train": dataset}),
        "DataFrame": pd.DataFrame(ROWS),
        "list": ROWS,
    }
    for kind, source in sources.items():
        assert read_source(source).rows == ROWS, kind
    assert read_source(tmp_path / "d.tsv").where(1) == f"{tmp_path / 'd.tsv'}, line 3 (row 1)"
    frame = pd.DataFrame(
        [{"instruction": "a", "output": "b", "input": None}, {"instruction": "c", "output": "d"}]
    )
    assert read_source(frame).rows[1] == {"instruction": "c", "output": "d", "input": None}  # NaN -> None
    with pytest.raises(DataError, match=r"has no 'train' split \(splits: \['test'\]\)"):
        read_source(datasets.DatasetDict({"test": dataset}))


def test_plain_text_per_line_per_file_and_directories(tmp_path, tiny_tokenizer):
    (tmp_path / "corpus.txt").write_text("The quick brown fox.\n\nhello world\n")
    read = read_source(tmp_path / "corpus.txt")
    assert read.rows == [{"text": "The quick brown fox."}, {"text": "hello world"}]
    assert read.lines == [1, 3] and read.skipped_blank == 1
    assert read_source(tmp_path / "corpus.txt", text_unit="file").rows == [
        {"text": "The quick brown fox.\n\nhello world\n"}
    ]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("hello world")
    (docs / "sub" / "b.md").write_text("The quick brown fox.")
    (docs / "empty.txt").write_text("  \n")
    (docs / "ignored.json").write_text("{}")
    read = read_source(docs)
    assert (
        read.rows == [{"text": "hello world"}, {"text": "The quick brown fox."}] and read.skipped_blank == 1
    )

    prepared = prep(tmp_path / "corpus.txt", tiny_tokenizer, template="alpaca")
    assert prepared.report.format == "text" and prepared.report.skipped_blank_lines == 1
    assert texts(tiny_tokenizer, prepared) == ["<s>The quick brown fox.</s>", "<s>hello world</s>"]
    first = prepared.train[0]
    assert first["labels"] == [IGNORE_INDEX, *first["input_ids"][1:]]  # all but BOS trained, EOS included
    assert prepared.report.turns_ending_with_eot == prepared.report.assistant_turns == 2


def test_hub_ids_are_tried_and_fail_with_the_fix(tiny_tokenizer):
    with pytest.raises(
        DataError, match=r"Cannot load 'someone/no-such-dataset'.*Hugging Face Hub dataset failed"
    ):
        prep("someone/no-such-dataset", tiny_tokenizer)


def test_explicit_val_source_of_another_kind(tmp_path, tiny_tokenizer):
    import pandas as pd

    prepared = prep(ROWS, tiny_tokenizer, val_source=pd.DataFrame([{"prompt": "Hi", "completion": "hello"}]))
    assert (prepared.report.train_rows, prepared.report.val_rows) == (2, 1)
    assert prepared.val["input_ids"] == [
        encode(CHAT, get_template("chatml"), tiny_tokenizer, max_length=64).input_ids
    ]


# --- formats ----------------------------------------------------------------------------------------------


def test_sharegpt_and_columns_and_format_override(tiny_tokenizer):
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    assert to_messages(sharegpt, "sharegpt", row_index=0, source_name="s") == [
        {"role": "system", "content": "Be brief."},
        *CHAT,
    ]
    assert prep([sharegpt], tiny_tokenizer).report.format == "sharegpt"
    mapped = prep(
        [{"question": "Hi", "answer": "hello"}],
        tiny_tokenizer,
        columns={"instruction": "question", "output": "answer"},
    )
    assert mapped.report.format == "alpaca"
    assert mapped.train["input_ids"] == [
        encode(CHAT, get_template("chatml"), tiny_tokenizer, max_length=64).input_ids
    ]
    both = [{"text": "hello world", "instruction": "Hi", "output": "hello"}]
    assert prep(both, tiny_tokenizer).report.format == "alpaca"
    assert prep(both, tiny_tokenizer, format="text").report.format == "text"
    with pytest.raises(
        DataError, match=r"columns= maps to 'answer', but the data has no such column \(columns: \["
    ):
        prep([{"question": "Hi", "reply": "x"}], tiny_tokenizer, columns={"output": "answer"})
    with pytest.raises(ConfigError, match="`format` must be one of alpaca, .* got 'csv'"):
        prep(ROWS, tiny_tokenizer, format="csv")


# --- cleaning ---------------------------------------------------------------------------------------------


def test_cleaning_steps_are_each_counted(tiny_tokenizer):
    decomposed = "Cafe\u0301"  # e + combining acute accent; NFC makes it one code point
    rows = [
        {"instruction": "Say one.", "output": "one"},
        {"instruction": " Say one. ", "output": "one"},  # a duplicate once stripped
        {"instruction": "Say it.", "output": decomposed},
        {"instruction": "Say nothing.", "output": " "},
        {"instruction": "x", "output": "y"},  # 2 characters: under min_chars
        {"instruction": "Say a lot. " * 20, "output": "ok"},  # over max_chars
    ]
    prepared = prep(rows, tiny_tokenizer, min_chars=3, max_chars=100)
    report = prepared.report
    assert report.rows_loaded == 6 and report.train_rows == 2
    assert report.dropped == {"empty_response": 1, "duplicate": 1, "too_short": 1, "too_long_chars": 1}
    assert (report.stripped_rows, report.nfc_normalized_rows) == (3, 1)
    assert "Café" in texts(tiny_tokenizer, prepared)[1]
    assert "1 rows dropped: exact duplicate" in report.summary()
    kept = prep(rows, tiny_tokenizer, dedup=False)
    assert kept.report.dropped_duplicates == 0 and kept.report.train_rows == 5
    assert count_rows(rows, val_split=0, seed=0, min_chars=3, max_chars=100) == (2, 0)


# --- bad input --------------------------------------------------------------------------------------------


def test_bad_files_name_file_line_field_and_fix(tmp_path, tiny_tokenizer):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d",}\n')
    with pytest.raises(
        DataError, match=r"bad\.jsonl, line 2: not valid JSON .*Each line must be one JSON object"
    ):
        prep(bad_json, tiny_tokenizer)

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "answer": "d"}\n')
    with pytest.raises(
        DataError,
        match=r"missing\.jsonl, line 3 \(row 1\): missing field 'output' \(fields present: \['answer', "
        r"'instruction'\]\)\. If your data names it differently, map it: columns=\{\"output\": \"<your column>\"\}",
    ):
        prep(missing, tiny_tokenizer)

    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"instruction": "a", "output": {"text": "b"}}\n')
    with pytest.raises(
        DataError, match=r"typed\.jsonl, line 1 \(row 0\): field 'output' must be text, got dict"
    ):
        prep(typed, tiny_tokenizer)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl has no rows \(the file or dataset is empty\)"):
        prep(empty, tiny_tokenizer)

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("instruction,output\nSay hi,hi\nSay caf\xe9,caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1\.csv, line 3: bytes that are not UTF-8 .*Save the file as UTF-8"
    ):
        prep(latin1, tiny_tokenizer)

    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps({"messages": [*CHAT, {"role": "tool", "content": "42"}]}) + "\n")
    with pytest.raises(
        DataError, match=r"roles\.jsonl, line 1 \(row 0\), messages\[2\]: unknown role 'tool'"
    ):
        prep(roles, tiny_tokenizer)

    sharegpt = [{"conversations": [{"from": "robot", "value": "x"}]}]
    with pytest.raises(DataError, match=r"row 0, conversations\[0\]: unknown speaker 'from': 'robot'"):
        prep(sharegpt, tiny_tokenizer)

    with pytest.raises(
        DataError, match="No training rows left from the list of rows: 2 loaded, 2 with an empty reply"
    ):
        prep([{"instruction": "a", "output": ""}, {"instruction": "b", "output": "  "}], tiny_tokenizer)


def test_a_role_the_template_cannot_render_names_the_row(tiny_tokenizer):
    no_system = get_template(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}]
    with pytest.raises(
        DataError,
        match=r"the list of rows, row 1: the template 'jinja' cannot render this conversation: .*System role not "
        r"supported.* on_bad_row='skip'",
    ):
        prep(rows, tiny_tokenizer, template=no_system)
    skipped = prep(rows, tiny_tokenizer, template=no_system, on_bad_row="skip")
    assert skipped.report.train_rows == 1 and skipped.report.skipped_bad_rows == 1
    assert "row 1: the template 'jinja' cannot render" in skipped.report.bad_row_examples[0]


def test_on_bad_row_skip_counts_and_keeps_the_reasons(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "Say one.", "output": "one"}),
                json.dumps({"instruction": "Say two."}),
                json.dumps({"instruction": ["x"], "output": "y"}),
                json.dumps({"instruction": "Say three.", "output": "three"}),
            ]
        )
    )
    prepared = prep(path, tiny_tokenizer, on_bad_row="skip")
    report = prepared.report
    assert report.train_rows == 2 and report.skipped_bad_rows == 2 and report.dropped == {"bad_row": 2}
    assert "mixed.jsonl, line 2 (row 1): missing field 'output'" in report.bad_row_examples[0]
    assert "line 3 (row 2): field 'instruction' must be text" in report.bad_row_examples[1]
    assert "2 rows skipped: bad row" in report.summary()
    with pytest.raises(ConfigError, match="`on_bad_row` must be 'error' or 'skip', got 'ignore'"):
        prep(path, tiny_tokenizer, on_bad_row="ignore")


# --- overflow policies ------------------------------------------------------------------------------------

LONG_PROMPT = {"instruction": "The quick brown fox jumps over the lazy dog. " * 6, "output": "hello world"}
LONG_REPLY = {"instruction": "Say it.", "output": "The quick brown fox jumps over the lazy dog. " * 6}
SHORT = {"instruction": "Say one.", "output": "one"}


def test_truncate_prompt_keeps_the_reply_and_bos(tiny_tokenizer):
    full = encode(
        to_messages(LONG_PROMPT, "alpaca", row_index=0, source_name="s"),
        get_template("chatml"),
        tiny_tokenizer,
        max_length=4096,
    )
    prepared = prep([LONG_PROMPT, SHORT], tiny_tokenizer, max_length=32)
    row = prepared.train[0]
    assert len(full.input_ids) > 32 and len(row["input_ids"]) == 32
    assert row["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert row["input_ids"][1:] == full.input_ids[-31:] and row["labels"][1:] == full.labels[-31:]
    assert prepared.report.truncated == 1 and prepared.report.truncated_response == 0


def test_truncate_keeps_the_start_and_drops_rows_left_without_trained_tokens(tiny_tokenizer):
    prepared = prep([LONG_PROMPT, LONG_REPLY, SHORT], tiny_tokenizer, max_length=32, on_overflow="truncate")
    report = prepared.report
    full = encode(
        to_messages(LONG_REPLY, "alpaca", row_index=0, source_name="s"),
        get_template("chatml"),
        tiny_tokenizer,
        max_length=4096,
    )
    # LONG_PROMPT's reply is entirely past token 32: dropped and counted, never trained silently.
    assert report.dropped_no_trainable_tokens == 1 and report.train_rows == 2
    assert prepared.train[0]["input_ids"] == full.input_ids[:32]
    assert report.truncated == 1 and report.truncated_response == 1
    assert (
        report.turns_missing_eot == 0 and report.turns_ending_with_eot == 1
    )  # the cut reply is not "missing"


def test_drop_counts_and_error_names_the_row(tmp_path, tiny_tokenizer):
    prepared = prep([LONG_PROMPT, SHORT, LONG_REPLY], tiny_tokenizer, max_length=32, on_overflow="drop")
    assert prepared.report.train_rows == 1 and prepared.report.dropped == {"overflow": 2}
    assert prepared.report.truncated == 0
    assert "2 rows dropped: longer than max_length=32 (on_overflow='drop')" in prepared.report.summary()
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [SHORT, LONG_REPLY]))
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 2 \(row 1\): \d+ tokens, over max_length=32 \(1 example"
    ):
        prep(path, tiny_tokenizer, max_length=32, on_overflow="error")
    with pytest.raises(
        ConfigError, match="`on_overflow` must be one of 'truncate_prompt', 'truncate', 'drop', 'error'"
    ):
        prep([SHORT], tiny_tokenizer, on_overflow="cut")


# --- cache and num_proc -----------------------------------------------------------------------------------


def test_second_run_hits_the_cache(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Say {i}.", "output": f"hello {i}"} for i in range(300)]
    started = time.perf_counter()
    first = prep(rows, tiny_tokenizer, template="model", cache=tmp_path, val_split=0.1)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    second = prep(rows, tiny_tokenizer, template="model", cache=tmp_path, val_split=0.1)
    warm = time.perf_counter() - started
    print(f"cache: cold {cold:.3f}s, warm {warm:.3f}s")  # measured, not asserted
    assert not first.report.cache_hit and second.report.cache_hit
    assert second.train.to_list() == first.train.to_list() and second.val.to_list() == first.val.to_list()
    assert {**second.report.to_dict(), "cache_hit": False} == first.report.to_dict()
    assert "loaded from the cache" in second.report.summary()
    # Any change to rows, template or settings is a miss.
    assert not prep(rows, tiny_tokenizer, template="chatml", cache=tmp_path, val_split=0.1).report.cache_hit
    assert not prep(
        rows[1:], tiny_tokenizer, template="model", cache=tmp_path, val_split=0.1
    ).report.cache_hit
    assert not prep(
        rows, tiny_tokenizer, template="model", cache=tmp_path, max_length=64, val_split=0.1
    ).report.cache_hit
    assert not prep(rows, tiny_tokenizer, template="model", cache=False).report.cache_hit


def test_num_proc_gives_the_same_data(tiny_tokenizer):
    rows = [{"instruction": f"Say {i}.", "output": f"hello {i}"} for i in range(40)]
    one = prep(rows, tiny_tokenizer, val_split=0.2)
    two = prep(rows, tiny_tokenizer, val_split=0.2, num_proc=2)
    assert two.train.to_list() == one.train.to_list() and two.val.to_list() == one.val.to_list()
    assert two.report == one.report
    with pytest.raises(ConfigError, match="`num_proc` must be a positive integer or None, got 0"):
        prep(rows, tiny_tokenizer, num_proc=0)
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'] }}\n{% endfor %}"
    bad = [{"messages": CHAT}] * 3 + [{"messages": [{"role": "system", "content": "x"}, *CHAT]}]
    with pytest.raises(DataError, match=r"the list of rows, row 3: the template 'jinja' cannot render"):
        prep(bad, tiny_tokenizer, template=strict, num_proc=2, dedup=False)
    skipped = prep(bad, tiny_tokenizer, template=strict, num_proc=2, dedup=False, on_bad_row="skip")
    assert skipped.report.train_rows == 3 and skipped.report.skipped_bad_rows == 1


def test_a_template_that_never_ends_turns_is_a_fatal_audit_problem(tiny_tokenizer):
    endless = Template("endless", user="{content}\n", assistant="{content}")
    report = prep([SHORT], tiny_tokenizer, template=endless).report
    assert report.assistant_turns == 1 and report.turns_ending_with_eot == 0
    fatal, _ = report.problems()
    assert "never learns to stop" in fatal[0]


def test_openai_content_parts_are_joined_and_other_parts_rejected(tiny_tokenizer):
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
            CHAT[1],
        ]
    }
    assert to_messages(parts, "messages", row_index=0, source_name="s") == CHAT
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, CHAT[1]]}
    with pytest.raises(DataError, match=r"row 3, messages\[0\], content\[0\]: only text parts"):
        to_messages(image, "messages", row_index=3, source_name="s")


def test_count_rows_takes_the_spec_options(tiny_tokenizer):
    """plan() can count with every with_dataset() option: count_rows(spec.source, **spec.prepare_kwargs())."""
    from lorakit.config import DataSpec

    spec = DataSpec(
        [{"q": "Say hi.", "a": "hi"}] * 3 + [{"q": f"Say {i}.", "a": str(i)} for i in range(7)],
        columns={"instruction": "q", "output": "a"},
        val_split=0.25,
    )
    assert count_rows(spec.source, **spec.prepare_kwargs()) == (6, 2)  # 2 duplicates dropped, then split


def test_continued_pretraining_on_a_directory_of_text_files(tiny_model_dir, tmp_path):
    import lorakit as lk

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog.\nhello world {i}")
    run = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, targets=("q_proj", "v_proj"))
        .with_dataset(docs, val_split=0.25, max_length=64, cache=False)
        .with_training(max_steps=2, batch_size=2, logging_steps=1)
        .train(tmp_path / "run")
    )
    assert run.data_report["format"] == "text" and run.data_report["train_rows"] == 3
    assert run.data_report["turns_ending_with_eot"] == run.data_report["assistant_turns"] == 4
    assert run.metrics["train_steps"] == 2 and run.metrics["eval_loss"] > 0

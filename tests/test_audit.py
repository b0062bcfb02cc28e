"""Inspect before training: Pipeline.prepare_data(), preview(), audit(), and train() stopping on fatal data."""

from __future__ import annotations

import pytest

import lorakit as lk
from lorakit.data import IGNORE_INDEX, DataReport, PreparedData, Preview
from lorakit.errors import ConfigError, DataError
from lorakit.templates import Template

ROWS = [{"instruction": f"Say {i}.", "output": f"hello {i}"} for i in range(10)]
ENDLESS = Template("endless", user="{content}\n", assistant="{content}")  # replies without an end-of-turn


def pipeline(tiny_model_dir, rows=ROWS, **options):
    options.setdefault("cache", False)
    return lk.Pipeline.from_model(tiny_model_dir).with_lora(r=4).with_dataset(rows, **options)


def test_prepare_data_returns_tokenized_sets_and_the_report(tiny_model_dir):
    prepared = pipeline(tiny_model_dir, template="chatml", val_split=0.2).prepare_data()
    assert isinstance(prepared, PreparedData)
    assert prepared.train.column_names == ["input_ids", "labels"] == prepared.val.column_names
    assert (len(prepared.train), len(prepared.val)) == (8, 2)
    assert (prepared.report.train_rows, prepared.report.val_rows) == (8, 2)


def test_audit_reports_lengths_trained_tokens_turns_and_hazards(tiny_model_dir):
    report = pipeline(tiny_model_dir, template="chatml", val_split=0).audit()
    assert isinstance(report, DataReport)
    assert report.rows_loaded == 10 and report.dropped == {}
    assert set(report.token_lengths) == {"min", "p50", "p90", "p99", "max"}
    assert report.token_lengths["min"] <= report.token_lengths["p50"] <= report.token_lengths["max"]
    assert report.trained_per_example["min"] > 0
    assert report.assistant_turns == report.turns_ending_with_eot == 10 and report.turns_missing_eot == 0
    assert report.pad_is_eos  # the tiny tokenizer has no pad token, so EOS pads: reported, and safe
    assert report.double_bos == 0
    assert report.problems() == ([], [])


def test_audit_finds_double_bos(tiny_model_dir):
    doubled = Template("doubled", begin="{bos}{bos}", user="{content}\n", assistant="{content}{eos}")
    report = pipeline(tiny_model_dir, template=doubled, val_split=0).audit()
    assert report.double_bos == 10
    fatal, warnings = report.problems()
    assert not fatal and "10 examples start with two BOS tokens" in warnings[0]


def test_train_stops_on_fatal_audit_problems_before_loading_weights(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load when the data audit fails")

    monkeypatch.setattr(lorakit.training, "load_base_model", no_weights)
    with pytest.raises(
        DataError, match=r"data audit of the list of rows failed:\n  - no trained span of the 10"
    ):
        pipeline(tiny_model_dir, template=ENDLESS, val_split=0).train(tmp_path / "run")
    fatal, _ = pipeline(tiny_model_dir, template=ENDLESS, val_split=0).audit().problems()
    assert "never learns to stop" in fatal[0]


def test_preview_highlights_trained_tokens(tiny_model_dir):
    preview = pipeline(tiny_model_dir, template="chatml", val_split=0, packing=True).preview(n=2)
    assert isinstance(preview, Preview) and len(preview.examples) == 2  # shown unpacked
    text = preview.render(color=False)
    assert "<|im_start|>assistant\n[[hello 0<|im_end|>]]\n" in text
    assert "--- example 1:" in text and "trained tokens between [[ and ]]" in text
    assert "\x1b[1;32mhello 0<|im_end|>\x1b[0m" in preview.render(color=True)
    html = preview._repr_html_()
    assert "<mark style='background:#b7f0b1'>hello 0&lt;|im_end|&gt;</mark>" in html
    assert "&lt;|im_start|&gt;user" in html
    assert [trained for _, trained in preview.examples[0].pieces] == [False, True, False]
    with pytest.raises(ConfigError, match=r"preview\(n\) needs a positive integer, got 0"):
        pipeline(tiny_model_dir).preview(n=0)


def test_preview_counts_match_the_labels(tiny_model_dir):
    p = pipeline(tiny_model_dir, template="alpaca", val_split=0)
    prepared = p.prepare_data()
    preview = p.preview(n=3)
    for example, labels in zip(preview.examples, prepared.train["labels"][:3], strict=True):
        assert example.n_trained == sum(label != IGNORE_INDEX for label in labels)
        assert example.n_tokens == len(labels)


def test_with_dataset_options_validate_and_round_trip(tiny_model_dir, tmp_path):
    import pandas as pd

    p = pipeline(
        tiny_model_dir,
        rows=pd.DataFrame([{"question": "Say hi.", "answer": "hi"}] * 2),
        val=pd.DataFrame([{"question": "Say yo.", "answer": "yo"}]),
        columns={"instruction": "question", "output": "answer"},
        on_overflow="drop",
        on_bad_row="skip",
        packing=True,
        min_chars=2,
        num_proc=1,
    )
    assert p.data.source == [{"question": "Say hi.", "answer": "hi"}] * 2  # a DataFrame is stored as rows
    assert p.data.column_map == {"instruction": "question", "output": "answer"}
    assert lk.Pipeline.from_config(p.to_config()) == p
    report = p.audit()
    assert (report.train_rows, report.val_rows, report.dropped_duplicates) == (1, 1, 1)
    for bad, message in [
        (
            {"on_overflow": "cut"},
            "`on_overflow` must be one of 'truncate_prompt', 'truncate', 'drop', 'error'",
        ),
        ({"on_bad_row": "ignore"}, "`on_bad_row` must be one of 'error', 'skip'"),
        ({"format": "csv"}, "`format` must be one of 'alpaca', 'prompt_completion', 'messages', 'sharegpt'"),
        ({"columns": ["question"]}, "`columns` must map lorakit field names to your column names"),
        ({"num_proc": 0}, "`num_proc` must be a positive integer"),
        ({"val": [1]}, "`val` given as a list must be a list of dicts"),
        ({"val": "no/such/val.jsonl"}, r"with_dataset\(val='no/such/val.jsonl'\): no such file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipeline(tiny_model_dir, **bad)
    # A string that is neither an existing path nor a data file name is taken as a Hub dataset id.
    assert (
        lk.Pipeline.from_model(tiny_model_dir).with_dataset("tatsu-lab/alpaca").data.source
        == "tatsu-lab/alpaca"
    )


def test_preview_shows_itself_in_a_repl(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    preview = pipeline(tiny_model_dir, template="chatml", val_split=0).preview(n=1)
    assert repr(preview) == str(preview) == preview.render(color=False)
    assert repr(preview).startswith("lorakit preview: 1 example(s), trained tokens between [[ and ]]")

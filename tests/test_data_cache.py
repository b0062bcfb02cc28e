"""Narrow error handling in data/: a partial or stale cache entry is recomputed (any other error
propagates); unreadable tables and Parquet files are DataErrors with the cause attached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import lorakit.data.prepare as prepare_module
from lorakit.data import load_source, prepare_data
from lorakit.data.load import rows_to_dataset
from lorakit.errors import DataError

ROWS = [{"instruction": f"Say {i}.", "output": f"hello {i}"} for i in range(20)]


def prep(tokenizer: Any, cache: Path):
    return prepare_data(ROWS, tokenizer=tokenizer, template="chatml", val_split=0.1, cache=cache)


def only_entry(cache: Path) -> Path:
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    return entries[0]


def truncate_arrow(entry: Path) -> None:
    arrow = next((entry / "train").glob("*.arrow"))
    with arrow.open("r+b") as handle:
        handle.truncate(100)


def drop_field(entry: Path) -> None:
    report = json.loads((entry / "report.json").read_text())
    del report["train_rows"]  # a report written by a version without this field
    (entry / "report.json").write_text(json.dumps(report))


CORRUPTIONS = {
    "arrow file cut short": truncate_arrow,
    "arrow file missing": lambda e: next((e / "train").glob("*.arrow")).unlink(),
    "state.json missing": lambda e: (e / "train" / "state.json").unlink(),
    "state.json cut short": lambda e: (e / "train" / "state.json").write_text('{"_data'),
    "state.json without its keys": lambda e: (e / "train" / "state.json").write_text("{}"),
    "state.json a list": lambda e: (e / "train" / "state.json").write_text("[]"),
    "report.json cut short": lambda e: (e / "report.json").write_text('{"source": "x'),
    "report.json not utf-8": lambda e: (e / "report.json").write_bytes(b"\xff\xfe{"),
    "report.json a list": lambda e: (e / "report.json").write_text("[1, 2]"),
    "report.json missing a field": drop_field,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_partial_or_stale_entry_is_recomputed(tmp_path, tiny_tokenizer, corrupt):
    first = prep(tiny_tokenizer, tmp_path)
    assert not first.report.cache_hit
    corrupt(only_entry(tmp_path))
    again = prep(tiny_tokenizer, tmp_path)
    assert not again.report.cache_hit
    assert again.train.to_list() == first.train.to_list()
    assert again.val.to_list() == first.val.to_list()
    assert again.report == first.report


def test_other_errors_while_loading_the_cache_propagate(tmp_path, tiny_tokenizer, monkeypatch):
    prep(tiny_tokenizer, tmp_path)
    assert prep(tiny_tokenizer, tmp_path).report.cache_hit

    def broken(path: str) -> Any:
        raise RuntimeError("not a cache problem")

    monkeypatch.setattr("datasets.load_from_disk", broken)
    with pytest.raises(RuntimeError, match="not a cache problem"):
        prep(tiny_tokenizer, tmp_path)


def test_stale_cache_errors_are_exactly_these():
    assert prepare_module._STALE_CACHE_ERRORS == (OSError, ValueError, KeyError, TypeError)


# --- load errors: narrowed, re-raised as DataError with the cause -------------------------------------------


@pytest.mark.parametrize(
    "rows",
    [[{"output": "x"}, {"output": 1}], [{"output": [1]}, {"output": "x"}], [{"n": 1}, {"n": 2**70}]],
    ids=["str-then-int", "list-then-str", "huge-int"],
)
def test_rows_that_cannot_form_a_table_are_a_data_error(rows):
    with pytest.raises(DataError, match=r"^rows: the rows cannot form a table \(\w+: ") as caught:
        rows_to_dataset(rows, "rows")
    assert caught.value.__cause__ is not None


def test_a_file_that_is_not_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"cannot read it as Parquet \(ArrowInvalid: ") as caught:
        load_source(path)
    assert caught.value.__cause__ is not None

"""Data fuzzing: any rows, in any format, file type and template, give examples or a LorakitError.

``prepare_data`` is called on what Hypothesis draws: random unicode (control characters, lone surrogates,
combining marks, right-to-left text), huge strings and numbers, nested and wrongly typed values, empty and
malformed conversations, rows of several formats mixed, and files of every accepted suffix with random
content or random bytes. The outcome must be prepared data whose examples fit ``max_length`` with labels
aligned, or a ``LorakitError`` (with ``on_bad_row="skip"``: bad rows counted), never another exception.

CI runs the ``ci`` profile (about 200 examples over the tests); ``scripts/fuzz_data.py`` runs the ``long``
profile (10,000+ examples) and prints the count.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_tiny_tokenizer  # noqa: E402  (the tests' tokenizer, also used by the script)

from lorakit.data import prepare_data  # noqa: E402
from lorakit.data.encode import IGNORE_INDEX  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.templates import TEMPLATES  # noqa: E402

# CI: ~200 examples in all (test_rows 120, test_files 60, test_sources 20); scripts/fuzz_data.py sets
# LORAKIT_FUZZ_EXAMPLES (10,000 or more), shared out in the same proportions.
CI_EXAMPLES = {"test_rows": 120, "test_files": 60, "test_sources": 20}


def examples(test: str) -> int:
    total = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES") or sum(CI_EXAMPLES.values()))
    return max(1, round(total * CI_EXAMPLES[test] / sum(CI_EXAMPLES.values())))


_COMMON = dict(
    deadline=None,
    derandomize=True,  # CI sees the same examples every run; the long profile explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)
settings.register_profile("ci", **_COMMON)
settings.register_profile("long", **{**_COMMON, "derandomize": False})
settings.load_profile(os.environ.get("LORAKIT_FUZZ_PROFILE", "ci"))

CALLS = {"examples": 0, "prepared": 0, "lorakit_errors": 0}
"""How many drawn cases ran, and how each ended (the script prints these)."""

# --- strategies ---------------------------------------------------------------------------------------------

_ODD = [
    "\x00",
    "\x1b[31m",
    "\r\n",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\ud800",
    "e\u0301",
    "\U0001f600",
    "<|im_end|>",
    "</s>",
    "{content}",
    "{{ raise }}",
    "{% if %}",
    "### Response:",
    "[INST]",
]
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(_ODD),
    st.lists(st.sampled_from(_ODD + ["a", " ", "word"]), max_size=8).map("".join),
    st.integers(min_value=2_000, max_value=60_000).map(lambda n: "x " * n),  # huge strings
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(5000).map(lambda digits: 10**digits),  # more digits than str() allows by default
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none()), children, max_size=4),
        st.tuples(children, children),
    ),
    max_leaves=12,
)
plain = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
# Mostly valid text (so many cases reach the templates and the tokenizer), sometimes odd text or anything.
field_values = st.one_of(plain, plain, plain, plain, plain, texts, texts, values)
roles = st.one_of(
    *[st.sampled_from(["system", "user", "assistant"])] * 4, st.sampled_from(["tool", "", "USER"]), values
)
speakers = st.one_of(st.sampled_from(["system", "human", "gpt", "user", "assistant", "bot"]), values)
content = st.one_of(
    field_values,
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": field_values}),
            st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text"]), "image_url": values}),
        ),
        max_size=3,
    ),
)
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": content}),
    st.dictionaries(st.sampled_from(["role", "content", "name", "from", "value"]), values, max_size=3),
    values,
)
exchange = st.tuples(field_values, field_values).map(
    lambda pair: [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
)
valid_turns = st.lists(exchange, min_size=1, max_size=3).map(
    lambda pairs: [m for pair in pairs for m in pair]
)
any_turns = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": field_values}),
        message,
    ),
    max_size=6,
)
turns = st.one_of(valid_turns, valid_turns, any_turns)
sharegpt_turn = st.one_of(st.fixed_dictionaries({"from": speakers, "value": field_values}), message)


def _row(required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy:
    extra = st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), values, max_size=2)
    row = st.fixed_dictionaries(required, optional=optional or {})
    return st.tuples(row, extra).map(lambda pair: {**pair[1], **pair[0]})


ROWS_BY_FORMAT = {
    "alpaca": _row(
        {"instruction": field_values, "output": field_values},
        {"input": field_values, "system": field_values},
    ),
    "prompt_completion": st.one_of(
        _row({"prompt": field_values, "completion": field_values}, {"system": field_values}),
        _row({"prompt": turns, "completion": turns}),
    ),
    "messages": _row({"messages": st.one_of(turns, turns, values)}),
    "sharegpt": _row(
        {
            "conversations": st.one_of(
                valid_turns.map(lambda ms: [{"from": m["role"], "value": m["content"]} for m in ms]),
                st.lists(sharegpt_turn, max_size=6),
                values,
            )
        }
    ),
    "text": _row({"text": field_values}),
}
any_row = st.one_of(
    *ROWS_BY_FORMAT.values(),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), values, max_size=3),
)
row_lists = st.one_of(
    st.sampled_from(list(ROWS_BY_FORMAT)).flatmap(
        lambda fmt: st.lists(ROWS_BY_FORMAT[fmt], min_size=1, max_size=6)
    ),
    st.sampled_from(list(ROWS_BY_FORMAT)).flatmap(
        lambda fmt: st.lists(ROWS_BY_FORMAT[fmt], min_size=1, max_size=6)
    ),
    st.lists(any_row, max_size=6),  # mixed row shapes (and no rows at all)
)
options = st.fixed_dictionaries(
    {
        "template": st.sampled_from(sorted(TEMPLATES)),
        "format": st.one_of(st.none(), st.none(), st.sampled_from(list(ROWS_BY_FORMAT))),
        "on_bad_row": st.sampled_from(["error", "skip", "skip"]),
        "on_overflow": st.sampled_from(["truncate_prompt", "truncate_prompt", "truncate", "drop", "error"]),
        "max_length": st.sampled_from([16, 64, 256, 256]),
        "packing": st.booleans(),
        "train_on_inputs": st.booleans(),
        "dedup": st.booleans(),
        "val_split": st.sampled_from([0.0, 0.0, 0.3]),
    }
)

# --- the property -------------------------------------------------------------------------------------------


@functools.cache
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def check(source: Any, opts: dict[str, Any]) -> None:
    """``prepare_data`` gives valid examples or raises a LorakitError; anything else fails the test."""
    CALLS["examples"] += 1
    try:
        prepared = prepare_data(source, tokenizer=tokenizer(), cache=False, **opts)
    except LorakitError:
        CALLS["lorakit_errors"] += 1
        return
    CALLS["prepared"] += 1
    report = prepared.report
    assert len(prepared.train) > 0
    if opts["on_bad_row"] == "error":
        assert report.skipped_bad_rows == 0
    for split in (prepared.train, prepared.val):
        if split is None:
            continue
        for example in split:
            ids, labels = example["input_ids"], example["labels"]
            assert 0 < len(ids) <= opts["max_length"] and len(labels) == len(ids)
            assert any(label != IGNORE_INDEX for label in labels), "an example with nothing to train on"
            assert all(0 <= token < len(tokenizer()) for token in ids)


@settings(max_examples=examples("test_rows"))
@given(rows=row_lists, opts=options)
def test_rows(rows, opts):
    """In-memory rows of every format (and mixed), with every template and option."""
    check(rows, opts)


_HUGE = "__lorakit_fuzz_huge_number__"


def _plain(value: Any) -> Any:
    """What a file can hold: huge integers as a marker (written back as digits), other odd values as repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**4000:
        return _HUGE
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _write(path: Path, rows: list[Any], raw: bytes | None) -> None:
    rows = _plain(rows)
    digits = "9" * 5000
    if raw is not None:
        path.write_bytes(raw)
    elif path.suffix in (".jsonl", ".json"):
        text = (
            "".join(json.dumps(row) + "\n" for row in rows) if path.suffix == ".jsonl" else json.dumps(rows)
        )
        path.write_text(text.replace(f'"{_HUGE}"', digits), errors="surrogatepass")
    elif path.suffix in (".csv", ".tsv"):
        buffer = io.StringIO()
        names = sorted({key for row in rows if isinstance(row, dict) for key in row})
        writer = csv.writer(buffer, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(names)
        for row in rows:
            writer.writerow([row.get(name, "") if isinstance(row, dict) else row for name in names])
        path.write_text(buffer.getvalue().replace(_HUGE, digits), errors="surrogatepass")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = [
            {
                k.encode("utf-8", "replace").decode(): str(v).encode("utf-8", "replace").decode()
                for k, v in row.items()
            }
            for row in rows
            if isinstance(row, dict)
        ]
        pq.write_table(pa.Table.from_pylist(table), path)
    else:
        path.write_text("\n".join(str(row) for row in rows).replace(_HUGE, digits), errors="surrogatepass")


@settings(max_examples=examples("test_files"))
@given(
    rows=row_lists,
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet"]),
    raw=st.one_of(
        st.none(),
        st.none(),
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    opts=options,
    text_unit=st.sampled_from(["line", "file"]),
)
def test_files(rows, suffix, raw, opts, text_unit):
    """Files of every accepted suffix, written from random rows or filled with random bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"data{suffix}"
        _write(path, rows, raw)
        check(str(path), {**opts, "text_unit": text_unit})


@settings(max_examples=examples("test_sources"))
@given(
    source=st.one_of(values.filter(lambda v: not isinstance(v, str)), st.lists(values, max_size=4)),
    opts=options,
)
def test_sources(source, opts):
    """Anything passed as a source (other than a string: paths are test_files' and Hub ids need the network):
    a LorakitError, never a crash."""
    check(source, opts)


def test_a_csv_cell_over_the_csv_module_limit_is_a_data_error(tmp_path):
    """Found by the long profile: csv's 131,072-character cell limit raised a raw _csv.Error."""
    path = tmp_path / "long.csv"
    path.write_text("instruction,output\nhi,ok\nsay,it\nlong," + "x" * 200_000 + "\n")
    with pytest.raises(
        LorakitError, match=r"long.csv, line 4: cannot read this comma-separated line \(field larger"
    ):
        prepare_data(str(path), tokenizer=tokenizer(), template="alpaca", cache=False)


def test_the_ci_profile_stays_small():
    assert sum(CI_EXAMPLES.values()) <= 250
    pytest.importorskip("hypothesis")

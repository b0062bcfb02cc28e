"""Reading rows from .json / .jsonl / .csv files, lists of dicts and ``datasets.Dataset`` objects.

Files are read with the standard library (no Hub, no cache directory), so what you see in the file is
exactly what gets trained on.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["SUFFIXES", "load_rows", "load_source", "rows_to_dataset"]

SUFFIXES = (".json", ".jsonl", ".csv")


def load_source(source: Any, *, name: str | None = None) -> Dataset:
    """Load a data source as a ``datasets.Dataset``.

    Args:
        source: a ``.json`` (an array of objects, or JSON lines), ``.jsonl`` or ``.csv`` path (str or Path),
            a list of dicts, or a ``datasets.Dataset``.
        name: how error messages call the source; defaults to the path, or "the list of rows".

    Raises:
        DataError: a missing file, an unknown extension, a malformed line (named by number), a row that is
            not an object, or no rows at all.

    Example:
        >>> load_source([{"instruction": "Say hi.", "output": "hi"}]).column_names
        ['instruction', 'output']
    """
    if _is_dataset(source):
        if len(source) == 0:
            raise DataError(
                f"{name or 'the Dataset passed as source'} has no rows. Add at least one example."
            )
        return source
    rows, label = load_rows(source, name=name)
    return rows_to_dataset(rows, label)


def load_rows(source: Any, *, name: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The rows of a source as plain dicts, and the name error messages use for the source.

    Raises:
        DataError: see :func:`load_source`.
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        label = name or str(source)
        rows = _read_file(path, label)
    elif _is_dataset(source):
        label = name or "the Dataset passed as source"
        rows = source.to_list()
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        label = name or "the list of rows"
        rows = list(source)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"{label}, row {index}: expected a dict of fields, got {type(row).__name__}.")
        rows = [dict(row) for row in rows]
    else:
        hint = " Pass dataset['train'] instead of the DatasetDict." if _is_dataset_dict(source) else ""
        raise DataError(
            f"Cannot read a dataset from {type(source).__name__}: pass a .json / .jsonl / .csv path, "
            f"a list of dicts, or a datasets.Dataset.{hint}"
        )
    if not rows:
        raise DataError(f"{label} has no rows. Add at least one example (see the formats in lorakit.data).")
    return rows, label


def rows_to_dataset(rows: list[dict[str, Any]], label: str) -> Dataset:
    """A Dataset with the union of the rows' fields as columns (a field a row lacks is None)."""
    from datasets import Dataset

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    try:
        return Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})
    except Exception as error:  # pyarrow type inference: e.g. a column mixing strings and numbers
        raise DataError(
            f"{label}: the rows cannot form a table ({type(error).__name__}: {error}). Give each field the "
            "same type in every row (e.g. quote numbers in 'output')."
        ) from error


def _read_file(path: Path, label: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{label}: unknown file type {path.suffix or '(no extension)'!r}. Use a .json, .jsonl or .csv "
            "file, or pass a list of dicts / a datasets.Dataset."
        )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"Data file {label} {what} (resolved to {path.resolve()}). Check the path.")
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        return _read_csv(text, label)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{label}, line {error.lineno}: not valid JSON ({error.msg}). A .json file holds one array "
                "of objects, or one object per line."
            ) from error
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{label}, row {index}: expected a JSON object, got {type(row).__name__}.")
        return rows
    return _read_json_lines(text, label)


def _read_json_lines(text: str, label: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{label}, line {number}: not valid JSON ({error.msg}). Each line must be one JSON object, "
                'e.g. {"instruction": "...", "output": "..."}.'
            ) from error
        if not isinstance(row, dict):
            raise DataError(f"{label}, line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _read_csv(text: str, label: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = []
    for row in reader:
        if None in row:
            raise DataError(
                f"{label}, line {reader.line_num}: more cells than the {len(reader.fieldnames or [])} header "
                "columns. Quote cells that contain commas."
            )
        rows.append({key: "" if value is None else value for key, value in row.items()})
    return rows


def _is_dataset(source: Any) -> bool:
    datasets = sys.modules.get("datasets")  # a Dataset exists only if datasets is imported already
    return datasets is not None and isinstance(source, datasets.Dataset)


def _is_dataset_dict(source: Any) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict))

"""Reading rows from files, directories, in-memory tables and the Hugging Face Hub.

Accepted sources (:func:`read_source`):

- ``.json`` (an array of objects, or JSON lines), ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet`` files;
- ``.txt`` / ``.md`` files for continued pre-training: one document per line (``text_unit="line"``, the
  default) or the whole file as one document (``text_unit="file"``);
- a directory: one written by ``datasets.save_to_disk`` (a ``DatasetDict`` gives its ``train`` split), or a
  folder of ``.txt`` / ``.md`` files, one document per file;
- a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts, a ``pandas.DataFrame``;
- a Hub dataset id such as ``"tatsu-lab/alpaca"`` (needs network; any string that is not an existing path
  and has no data-file extension), with ``with_dataset(config=, split=, streaming=)`` passed to
  ``datasets.load_dataset``.

JSON, CSV and text files are read with the standard library, so what you see in the file is exactly what
gets trained on, and a bad line is named by its number.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "SUFFIXES",
    "TEXT_SUFFIXES",
    "Source",
    "iterate_hub",
    "load_rows",
    "load_source",
    "open_hub",
    "read_source",
    "rows_to_dataset",
]

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", *TEXT_SUFFIXES)
TEXT_UNITS = ("line", "file")


@attrs.frozen
class Source:
    """The rows of one source, how messages name it, and where each row came from."""

    rows: list[dict[str, Any]]
    """One dict of fields per row."""
    label: str
    """How error messages call the source (the path, or e.g. "the list of rows")."""
    lines: list[int] | None = None
    """The file line of each row (JSON lines, CSV, text lines); None when rows have no line."""
    skipped_blank: int = 0
    """Blank lines of a text file that were skipped (counted in the data report)."""
    first_row: int = 0
    """The row number of ``rows[0]`` in the whole source (a chunk of a stream starts past 0)."""

    def where(self, index: int) -> str:
        """``"data.jsonl, line 12 (row 10)"`` or ``"the list of rows, row 10"``."""
        if self.lines is not None:
            return f"{self.label}, line {self.lines[index]} (row {index + self.first_row})"
        return f"{self.label}, row {index + self.first_row}"


def load_source(source: Any, *, name: str | None = None) -> Dataset:
    """Load a data source as a ``datasets.Dataset``.

    Args:
        source: any source :func:`read_source` accepts.
        name: how error messages call the source; defaults to the path, or "the list of rows".

    Raises:
        DataError: a missing file, an unknown extension, a malformed line (named by number), bytes that are
            not UTF-8, a row that is not an object, or no rows at all.

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
    read = read_source(source, name=name)
    return read.rows, read.label


def read_source(source: Any, *, name: str | None = None, text_unit: str = "line") -> Source:
    """Read any accepted source (see the module docstring) into a :class:`Source`.

    Raises:
        DataError: see :func:`load_source`; the message names the file, the line and the fix.
    """
    if text_unit not in TEXT_UNITS:
        raise DataError(f"`text_unit` must be 'line' or 'file', got {text_unit!r}.")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        label = name or str(source)
        if path.is_dir():
            read = _read_directory(path, label)
        elif path.suffix.lower() in SUFFIXES or path.exists() or isinstance(source, Path):
            read = _read_file(path, label, text_unit)
        else:
            read = _read_hub(source, label)  # a HubDataset keeps its options
    elif _is_dataset(source):
        read = Source(source.to_list(), name or "the Dataset passed as source")
    elif _is_dataset_dict(source):
        read = Source(_train_split(source, name or "the DatasetDict").to_list(), name or "the DatasetDict")
    elif _is_dataframe(source):
        label = name or "the DataFrame"
        read = Source(_frame_rows(source), label)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes, bytearray)):
        label = name or "the list of rows"
        rows = list(source)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"{label}, row {index}: expected a dict of fields, got {type(row).__name__}.")
        read = Source([dict(row) for row in rows], label)
    else:
        raise DataError(
            f"Cannot read a dataset from {type(source).__name__}: pass a file path (.json, .jsonl, .csv, "
            ".tsv, .parquet, .txt), a directory, a Hub dataset id, a list of dicts, a pandas DataFrame, or a "
            "datasets.Dataset / DatasetDict."
        )
    if not read.rows:
        raise DataError(
            f"{read.label} has no rows (the file or dataset is empty). Add at least one example (see the "
            "formats in lorakit.data)."
        )
    return read


def rows_to_dataset(rows: list[dict[str, Any]], label: str) -> Dataset:
    """A Dataset with the union of the rows' fields as columns (a field a row lacks is None)."""
    import pyarrow
    from datasets import Dataset

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    try:
        return Dataset.from_dict({column: [row.get(column) for row in rows] for column in columns})
    except (
        pyarrow.ArrowException,
        OverflowError,
    ) as error:  # type inference: a column mixing types, a huge int
        raise DataError(
            f"{label}: the rows cannot form a table ({type(error).__name__}: {error}). Give each field the "
            "same type in every row (e.g. quote numbers in 'output')."
        ) from error


# --- files ------------------------------------------------------------------------------------------------


def _read_file(path: Path, label: str, text_unit: str) -> Source:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{label}: unknown file type {path.suffix or '(no extension)'!r}. Use a .json, .jsonl, .csv, .tsv, "
            ".parquet or .txt file, or pass a list of dicts / a datasets.Dataset."
        )
    if not path.is_file():
        raise DataError(f"Data file {label} does not exist (resolved to {path.resolve()}). Check the path.")
    if suffix == ".parquet":
        return _read_parquet(path, label)
    text = _read_text(path, label)
    if suffix in TEXT_SUFFIXES:
        return _read_plain_text(text, label, text_unit)
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, label, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, a number too long, nesting too deep
            raise DataError(
                f"{label}, line {getattr(error, 'lineno', '?')}: not valid JSON ({_json_problem(error)}). A "
                ".json file holds one array of objects, or one object per line."
            ) from error
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{label}, row {index}: expected a JSON object, got {type(row).__name__}.")
        return Source(rows, label)
    return _read_json_lines(text, label)


def _read_text(path: Path, label: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{label}, line {line}: bytes that are not UTF-8 ({data[error.start : error.start + 4]!r} at byte "
            f"{error.start}). Save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 in > out."
        ) from error


def _read_json_lines(text: str, label: str) -> Source:
    rows = []
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, a number too long, nesting too deep
            raise DataError(
                f"{label}, line {number}: not valid JSON ({_json_problem(error)}). Each line must be one JSON "
                'object, e.g. {"instruction": "...", "output": "..."}.'
            ) from error
        if not isinstance(row, dict):
            raise DataError(f"{label}, line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
        lines.append(number)
    return Source(rows, label, lines)


def _json_problem(error: BaseException) -> str:
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"


def _read_csv(text: str, label: str, *, delimiter: str) -> Source:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    rows = []
    lines = []
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # e.g. a cell over csv.field_size_limit() (131,072 characters by default)
            raise DataError(
                f"{label}, line {reader.line_num + 1}: cannot read this {kind} line ({error}). Very long texts "
                "belong in a .jsonl file (one JSON object per line), which has no cell size limit."
            ) from error
        if None in row:
            raise DataError(
                f"{label}, line {reader.line_num}: more cells than the {len(reader.fieldnames or [])} header "
                f"columns ({kind}). Quote cells that contain the separator."
            )
        rows.append({key: "" if value is None else value for key, value in row.items()})
        lines.append(reader.line_num)
    return Source(rows, label, lines)


def _read_plain_text(text: str, label: str, text_unit: str) -> Source:
    if text_unit == "file":
        return Source([{"text": text}] if text.strip() else [], label)
    rows, lines, blank = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append({"text": line})
            lines.append(number)
        else:
            blank += 1
    return Source(rows, label, lines, skipped_blank=blank)


def _read_parquet(path: Path, label: str) -> Source:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:  # ArrowInvalid: not a Parquet file
        raise DataError(
            f"{label}: cannot read it as Parquet ({type(error).__name__}: {error}). Check that the file is "
            "a Parquet file (e.g. written by pandas.DataFrame.to_parquet)."
        ) from error
    return Source(table.to_pylist(), label)


def _read_directory(path: Path, label: str) -> Source:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        loaded = load_from_disk(str(path))
        if _is_dataset_dict(loaded):
            loaded = _train_split(loaded, label)
        return Source(loaded.to_list(), label)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DataError(
            f"{label} is a directory with neither a datasets.save_to_disk dataset (dataset_info.json) nor "
            ".txt / .md files. Pass a data file, or a directory of text files (one document per file)."
        )
    rows = []
    for file in files:
        text = _read_text(file, str(file))
        if text.strip():
            rows.append({"text": text})
    return Source(rows, label, skipped_blank=len(files) - len(rows))


def _read_hub(dataset_id: str, label: str) -> Source:
    """A Hub dataset through ``datasets.load_dataset``. A :class:`lorakit.config.HubDataset` id carries the
    config, split and streaming options of ``with_dataset``; a streamed one reads its first ``max_rows`` rows
    (what ``max_steps`` consumes) and never the whole dataset."""
    hub = dataset_id if hasattr(dataset_id, "streaming") else None  # a HubDataset (str.split is a method)
    streaming, max_rows = (hub.streaming, hub.max_rows) if hub is not None else (False, None)
    if streaming and max_rows is None:
        raise DataError(
            f"{label!r} is streamed: lorakit reads only the rows with_training(max_steps=...) consumes, so it "
            "is read by train() / plan(), which count them. Set max_steps, or load without streaming."
        )
    loaded = open_hub(dataset_id, label)
    if not streaming:
        return Source(loaded.to_list(), label)
    rows = list(itertools.islice(iterate_hub(loaded, dataset_id, label), max_rows))
    split = (hub.split if hub is not None else None) or "train"
    return Source(rows, f"{label} ({split}, streamed: first {len(rows)} rows)")


def open_hub(dataset_id: str, label: str) -> Any:
    """``datasets.load_dataset`` of a Hub id with its ``HubDataset`` config, split and streaming options: a
    ``Dataset``, or with streaming an iterable that reads rows only as they are asked for (the one place
    lorakit calls ``load_dataset``).

    Raises:
        DataError: the dataset cannot be opened (offline, unknown id, gated, bad config or split).
    """
    from datasets import load_dataset

    config, split, streaming = _hub_options(dataset_id)
    try:
        return load_dataset(str(dataset_id), config, split=split, streaming=streaming)
    except Exception as error:  # datasets/huggingface_hub raise many types (offline, unknown id, gated, bad config): re-raised with context
        raise _hub_error(label, error, dataset_id) from error


def iterate_hub(loaded: Any, dataset_id: str, label: str) -> Iterator[dict[str, Any]]:
    """The rows of an opened stream, one at a time; a failure while reading (the network dropped, a corrupt
    shard) becomes a DataError naming the dataset."""
    iterator = iter(loaded)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (
            Exception
        ) as error:  # as in open_hub: many reader / network error types, re-raised with context
            raise _hub_error(label, error, dataset_id) from error
        yield row


def _hub_options(dataset_id: str) -> tuple[str | None, str, bool]:
    """(config, split, streaming) of a Hub id: a HubDataset carries them (str.split is a method, so
    ``hasattr(id, "streaming")`` tells a HubDataset from a plain string)."""
    if not hasattr(dataset_id, "streaming"):
        return None, "train", False
    hub: Any = dataset_id
    return hub.config, hub.split or "train", hub.streaming


def _hub_error(label: str, error: BaseException, dataset_id: str) -> DataError:
    config, split, streaming = _hub_options(dataset_id)
    return DataError(
        f"Cannot load {label!r}: it is not a local file or directory, and loading it as a Hugging Face "
        f"Hub dataset failed ({type(error).__name__}: {str(error)[:300]}; config={config!r}, "
        f"split={split!r}, streaming={streaming}). Check the path, or the dataset id, config and split, "
        "and your network / HF_TOKEN."
    )


# --- in-memory tables -------------------------------------------------------------------------------------


def _train_split(dataset_dict: Any, label: str) -> Any:
    if "train" not in dataset_dict:
        raise DataError(
            f"{label} has no 'train' split (splits: {list(dataset_dict)}). Pass one split, e.g. "
            f"dataset[{next(iter(dataset_dict), 'train')!r}]."
        )
    return dataset_dict["train"]


def _frame_rows(frame: Any) -> list[dict[str, Any]]:
    rows = frame.to_dict(orient="records")
    return [{str(k): (None if _is_nan(v) else v) for k, v in row.items()} for row in rows]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _is_dataset(source: Any) -> bool:
    datasets = sys.modules.get("datasets")  # a Dataset exists only if datasets is imported already
    return datasets is not None and isinstance(source, datasets.Dataset)


def _is_dataset_dict(source: Any) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.DatasetDict)


def _is_dataframe(source: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(source, pandas.DataFrame)

"""True streaming: a dataset larger than memory, read, cleaned, encoded and masked a few rows at a time while
the Trainer draws batches (``with_dataset("org/name", streaming=True)`` with ``with_training(max_steps=...)``).

Rows go through the code of the in-memory path (:mod:`lorakit.data.prepare`), chunk by chunk: rename columns
-> messages (a bad row raises or is skipped and counted) -> drop empty replies, duplicates, rows outside the
character limits -> render, tokenize and mask (:class:`lorakit.data.encode.Encoder`) -> overflow policy ->
audit. Held in memory: the chunk being encoded, a 16-byte fingerprint per row read (duplicates) and two
integers per example (lengths for the report); never the dataset. Rows are read only as batches are drawn:
the run reads about ``max_steps x batch_size x grad_accum`` rows, plus one chunk and the batch the data loader
fetches ahead.

How a stream differs from the in-memory path (the data report says ``streamed``):

- the row format is detected from the first row's columns (or ``with_dataset(format=...)``);
- with ``val_split``, the validation rows are the stream's first rows (held out, in memory; as many as the
  plan counts), the training rows come after them; with ``val=...`` that source is prepared in memory;
- before training, the first examples are read once (the probe): the audit's fatal checks run on them, and
  the run report shows them; the counts recorded at the end are those of the rows read while training;
- rows train in stream order (no length grouping), packing is not available, and a stream shorter than the run
  is read again from its start (its rows counted again).

The trainer gets a ``datasets.IterableDataset`` over the stream (TRL's trainers take ``Dataset`` or
``IterableDataset``); the Trainer's data loader draws from it in the main process (no workers).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from lorakit.data.encode import Encoded, Encoder
from lorakit.data.formats import detect_format, rename_columns
from lorakit.data.load import Source, iterate_hub, open_hub
from lorakit.data.prepare import (
    _EXAMPLES_KEPT,
    DataReport,
    PreparedData,
    _apply_overflow_policy,
    _audit,
    _convert,
    _encode,
    _filter,
    _Options,
    _quantiles,
    _to_dataset,
    _trainable,
    new_counts,
    prepare_data,
)
from lorakit.errors import ConfigError, DataError
from lorakit.templates import PromptTemplate, get_template

__all__ = ["EncodedStream", "StreamedData", "prepare_stream"]

CHUNK_ROWS = 16
"""Rows read and encoded together (the tokenizer is called once per chunk)."""
_AUDIT_KEYS = ("assistant_turns", "turns_ending_with_eot", "turns_missing_eot", "double_bos")


@attrs.define
class _Tally:
    """The counts of one reading of a stream: the probe, the validation head, or training."""

    counts: dict[str, Any] = attrs.field(factory=new_counts)
    seen: set[bytes] = attrs.field(factory=set)
    truncated: int = 0
    truncated_response: int = 0
    no_trainable: int = 0
    overflow: int = 0
    lengths: list[int] = attrs.field(factory=list)
    trained: list[int] = attrs.field(factory=list)
    audit: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(_AUDIT_KEYS, 0))

    def add(self, every: list[Encoded], kept: list[Encoded], audit: dict[str, Any]) -> None:
        """Count one encoded chunk: ``every`` example within the limit (or cut to it), the ``kept`` ones."""
        self.truncated += sum(e.truncated and e.has_trainable_tokens for e in every)
        self.truncated_response += sum(e.reply_cut and e.has_trainable_tokens for e in every)
        self.no_trainable += sum(not e.has_trainable_tokens for e in every)
        self.lengths.extend(len(e.input_ids) for e in kept)
        self.trained.extend(e.n_trained_tokens for e in kept)
        for key in _AUDIT_KEYS:
            self.audit[key] += audit[key]


@attrs.frozen
class _Encoding:
    """How raw rows become examples: the options, tokenizer and template of :func:`lorakit.data.prepare_data`."""

    tokenizer: Any
    template: PromptTemplate
    options: _Options
    label: str
    fmt: str
    encoder: Encoder

    def examples(self, rows: Iterable[dict[str, Any]], tally: _Tally, *, first_row: int) -> Iterator[Encoded]:
        """The examples of ``rows`` (row numbers from ``first_row``), encoded ``CHUNK_ROWS`` rows at a time."""
        index = first_row
        iterator = iter(rows)
        while chunk := list(itertools.islice(iterator, CHUNK_ROWS)):
            yield from self._chunk(chunk, index, tally)
            index += len(chunk)

    def _chunk(self, rows: list[dict[str, Any]], first_row: int, tally: _Tally) -> list[Encoded]:
        options, counts = self.options, tally.counts
        renamed = rename_columns(rows, options.columns, source_name=self.label)
        counts["rows_loaded"] += len(rows)
        read = Source(renamed, self.label, first_row=first_row)
        conversations = _convert(read, renamed, self.fmt, counts, on_bad_row=options.on_bad_row)  # type: ignore[arg-type]
        kept_rows = _filter(
            conversations,
            counts,
            dedup=options.dedup,
            min_chars=options.min_chars,
            max_chars=options.max_chars,
            seen=tally.seen,
        )
        encoded, bad = _encode(
            self.encoder, kept_rows, self.template, options.encode_args(), options.on_bad_row, None
        )
        counts["skipped_bad_rows"] += len(bad)
        counts["bad_row_examples"] = (counts["bad_row_examples"] + bad)[:_EXAMPLES_KEPT]
        tally.overflow += _apply_overflow_policy(encoded, options.max_length, options.on_overflow)
        every = [e for _, e in encoded if not e.overflow]
        kept = _trainable(encoded)
        tally.add(every, kept, _audit(kept, kept, self.tokenizer, self.template))
        return kept

    def report(self, train: _Tally, val: _Tally | None, val_rows: int) -> DataReport:
        """The :class:`DataReport` of the rows read: training's counts, plus the validation head's."""
        tallies = [train] if val is None else [train, val]
        count = {
            key: sum(t.counts[key] for t in tallies) for key in new_counts() if key != "bad_row_examples"
        }
        examples = [example for t in tallies for example in t.counts["bad_row_examples"]][:_EXAMPLES_KEPT]
        trained = train.trained
        return DataReport(
            source=self.label,
            format=self.fmt,
            max_length=self.options.max_length,
            rows_loaded=count["rows_loaded"],
            dropped_empty_response=count["dropped_empty_response"],
            truncated=sum(t.truncated for t in tallies),
            truncated_response=sum(t.truncated_response for t in tallies),
            dropped_no_trainable_tokens=sum(t.no_trainable for t in tallies),
            train_rows=len(train.lengths),
            val_rows=val_rows,
            train_tokens=sum(train.lengths),
            trained_tokens=sum(trained),
            skipped_bad_rows=count["skipped_bad_rows"],
            bad_row_examples=tuple(examples),
            stripped_rows=count["stripped"],
            nfc_normalized_rows=count["nfc_normalized"],
            dropped_duplicates=count["dropped_duplicates"],
            dropped_too_short=count["dropped_too_short"],
            dropped_too_long_chars=count["dropped_too_long_chars"],
            dropped_overflow=sum(t.overflow for t in tallies),
            on_overflow=self.options.on_overflow,
            token_lengths=_quantiles(sorted(train.lengths)),
            trained_per_example=(
                {"min": min(trained), "mean": round(sum(trained) / len(trained), 2), "max": max(trained)}
                if trained
                else {}
            ),
            **{key: sum(t.audit[key] for t in tallies) for key in _AUDIT_KEYS},
            pad_is_eos=self.tokenizer.pad_token_id is not None
            and self.tokenizer.pad_token_id == self.tokenizer.eos_token_id,
            streamed=True,
        )


class EncodedStream:
    """The training examples of a stream, ``{"input_ids", "labels"}`` one at a time, read and encoded only as
    they are asked for. Each pass (``iter()``) opens the stream again and skips the validation head; its counts
    accumulate in ``tally``. Until :meth:`start` (when training starts) a pass yields the probe's examples
    without reading: TRL peeks at the first example when the trainer is built."""

    def __init__(self, encoding: _Encoding, source: str, *, skip: int, probe: list[Encoded]) -> None:
        self.encoding = encoding
        self.source = source
        self.skip = skip
        self.probe = probe
        self.tally = _Tally()
        self.passes = 0
        self.started = False

    def start(self) -> None:
        """From now on, passes read the stream (and count what they read)."""
        self.started = True

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        if not self.started:
            examples: Iterable[Encoded] = self.probe
        else:
            self.passes += 1
            self.tally.seen.clear()  # a new pass over the stream: its rows are not duplicates of the last pass
            label = self.encoding.label
            opened = iterate_hub(open_hub(self.source, label), self.source, label)
            rows = itertools.islice(opened, self.skip, None)
            examples = self.encoding.examples(rows, self.tally, first_row=self.skip)
        for example in examples:
            yield {"input_ids": example.input_ids, "labels": example.labels}


def _generate(stream: EncodedStream) -> Iterator[dict[str, list[int]]]:
    """The generator of the ``datasets.IterableDataset`` the trainer gets."""
    yield from stream


@attrs.define
class StreamedData:
    """A streamed training set, shaped like :class:`lorakit.data.PreparedData` for ``train()``."""

    stream: EncodedStream
    """The training examples, read lazily."""
    train: Any
    """``stream`` as a ``datasets.IterableDataset`` (what TRL's trainers accept)."""
    val: Any
    """The validation rows (a ``datasets.Dataset``, in memory), or None."""
    planned_rows: int
    """Training examples the run's steps consume (``max_steps x batch_size x grad_accum``)."""
    probe_tally: _Tally
    val_tally: _Tally | None

    @property
    def report(self) -> DataReport:
        """The counts of the rows read while training (before training: of the probe's rows)."""
        read = self.stream.tally if self.stream.passes else self.probe_tally
        val_rows = len(self.val) if self.val is not None else 0
        return self.stream.encoding.report(read, self.val_tally, val_rows)

    def sample(self) -> PreparedData:
        """The probe's examples as a :class:`PreparedData` (what the run report shows of the data)."""
        options = self.stream.encoding.options
        train = _to_dataset(self.stream.probe, packing=False, max_length=options.max_length)
        return PreparedData(train=train, val=self.val, report=self.report)


def prepare_stream(
    source: str,
    *,
    tokenizer: Any,
    template: Any,
    val_rows: int,
    planned_rows: int,
    probe_examples: int,
    **options: Any,
) -> StreamedData:
    """The streamed counterpart of :func:`lorakit.data.prepare_data` for a streamed Hub dataset ``source``.

    Args:
        source: a :class:`lorakit.config.HubDataset` with ``streaming=True``.
        tokenizer, template: as for :func:`lorakit.data.prepare_data`.
        val_rows: the stream's first rows held out for validation (0 for none, or with ``val_source``).
        planned_rows: training examples the run consumes (for the step count; the stream is not counted).
        probe_examples: training examples read before training for the audit and the report.
        options: the other keyword arguments of :func:`lorakit.data.prepare_data` (``packing`` must be False).

    Raises:
        ConfigError: ``packing=True``. DataError: the stream cannot be opened, has no rows, a bad row under
            ``on_bad_row="error"``, or no training example among the first rows.
    """
    template = get_template(template)
    checked = _Options(**{name: options[name] for name in attrs.fields_dict(_Options)})
    if checked.packing:
        raise ConfigError("with_dataset(streaming=True, packing=True): a stream is not packed. Drop packing.")
    split = getattr(source, "split", None) or "train"
    label = f"{source} ({split}, streamed)"
    rows = iterate_hub(open_hub(source, label), source, label)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{label} has no rows. Check the dataset id, config and split.")
    present = rename_columns([first], checked.columns, source_name=label)[0]
    encoding = _Encoding(
        tokenizer, template, checked, label, checked.format or detect_format(present), Encoder(tokenizer)
    )
    rows = itertools.chain([first], rows)
    val, val_tally = _validation(encoding, rows, val_rows, checked)
    probe_tally = _Tally()
    probe = list(itertools.islice(encoding.examples(rows, probe_tally, first_row=val_rows), probe_examples))
    if not probe:
        raise DataError(
            f"No training example in the first {probe_tally.counts['rows_loaded']} rows of {label} after "
            f"{val_rows} held out for validation: see the data report's drop reasons. Fix the rows, raise "
            "max_length, or lower val_split."
        )
    stream = EncodedStream(encoding, source, skip=val_rows, probe=probe)
    return StreamedData(stream, _iterable(stream), val, planned_rows, probe_tally, val_tally)


def _iterable(stream: EncodedStream) -> Any:
    from datasets import Features, IterableDataset, List, Value

    features = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
    return IterableDataset.from_generator(_generate, features=features, gen_kwargs={"stream": stream})


def _validation(
    encoding: _Encoding, rows: Iterator[dict[str, Any]], val_rows: int, options: _Options
) -> tuple[Any, _Tally | None]:
    """The validation set: ``val_source`` prepared in memory, or the stream's first ``val_rows`` rows."""
    if options.val_source is not None:
        prepared = prepare_data(
            options.val_source,
            tokenizer=encoding.tokenizer,
            template=encoding.template,
            val_split=0.0,
            max_length=options.max_length,
            train_on_inputs=options.train_on_inputs,
            format=options.format,
            columns=options.columns,
            on_overflow=options.on_overflow,
            on_bad_row=options.on_bad_row,
            cache=False,
        )
        return prepared.train, None
    if not val_rows:
        return None, None
    tally = _Tally()
    head = list(encoding.examples(itertools.islice(rows, val_rows), tally, first_row=0))
    dataset = _to_dataset(head, packing=False, max_length=options.max_length) if head else None
    return dataset, tally

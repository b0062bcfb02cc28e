"""From a source to tokenized train / validation sets, with a report of everything kept, cut or dropped.

The steps of :func:`prepare_data`, each counted in the :class:`DataReport`:

    read rows -> map columns -> convert to messages (strip, NFC; bad rows error or skip)
      -> drop empty replies -> drop exact duplicates -> length filters -> split (seeded)
      -> render + tokenize (batched, cached, ``num_proc``) -> overflow policy -> audit -> optional packing
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit import __version__
from lorakit.data.encode import IGNORE_INDEX, Encoded, Encoder, _check_max_length, check_overflow
from lorakit.data.formats import FORMATS, TEXT_ROLE, Format, detect_format, rename_columns, to_messages
from lorakit.data.load import read_source
from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.templates import PromptTemplate, get_template

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "BAD_ROW_POLICIES",
    "DataReport",
    "PreparedData",
    "cache_dir",
    "count_rows",
    "pack",
    "prepare_data",
    "split_indices",
]

BAD_ROW_POLICIES = ("error", "skip")
CACHE_VERSION = 1
_EXAMPLES_KEPT = 5


@attrs.frozen
class DataReport:
    """What data preparation kept, cut and dropped, and what the audit found. Every row and cut is counted."""

    source: str
    """The training source, as error messages name it."""
    format: str
    """The row format: ``alpaca``, ``prompt_completion``, ``messages``, ``sharegpt`` or ``text``."""
    max_length: int
    """The token limit rows were cut to."""
    rows_loaded: int
    """Rows read (training source plus ``val_source``, if any)."""
    dropped_empty_response: int
    """Rows dropped because a reply was empty (after stripping whitespace)."""
    truncated: int
    """Kept rows that lost tokens to ``max_length`` (prompt tokens from the left, or the end)."""
    truncated_response: int
    """Of those, rows whose final reply lost its end (its EOS / end-of-turn is not trained)."""
    dropped_no_trainable_tokens: int
    """Rows dropped because no trained token survived truncation (never trained silently)."""
    train_rows: int
    """Examples in the training set (before packing)."""
    val_rows: int
    """Examples in the validation set."""
    train_tokens: int
    """Tokens in the training set."""
    trained_tokens: int
    """Training-set tokens that carry loss."""
    skipped_bad_rows: int = 0
    """Rows skipped under ``on_bad_row="skip"`` (malformed, unknown role, ...)."""
    bad_row_examples: tuple[str, ...] = ()
    """The first few skip reasons, with file, line / row and field."""
    skipped_blank_lines: int = 0
    """Blank lines (or empty files) of plain-text sources, skipped."""
    stripped_rows: int = 0
    """Rows whose text had surrounding whitespace stripped."""
    nfc_normalized_rows: int = 0
    """Rows whose text changed under Unicode NFC normalisation."""
    dropped_duplicates: int = 0
    """Rows dropped as exact duplicates of an earlier row (after cleaning)."""
    dropped_too_short: int = 0
    """Rows dropped by ``min_chars``."""
    dropped_too_long_chars: int = 0
    """Rows dropped by ``max_chars``."""
    dropped_overflow: int = 0
    """Rows longer than ``max_length`` dropped under ``on_overflow="drop"``."""
    on_overflow: str = "truncate_prompt"
    """The overflow policy used."""
    token_lengths: dict[str, float] = attrs.field(factory=dict)
    """Training example lengths in tokens: ``min``, ``p50``, ``p90``, ``p99``, ``max``."""
    trained_per_example: dict[str, float] = attrs.field(factory=dict)
    """Trained tokens per training example: ``min``, ``mean``, ``max``."""
    assistant_turns: int = 0
    """Trained spans (assistant replies, or text documents) in the kept examples."""
    turns_ending_with_eot: int = 0
    """Of those, spans whose last trained tokens are an end-of-turn / EOS string."""
    turns_missing_eot: int = 0
    """Spans not cut by truncation that still do not end with an end-of-turn / EOS (the model won't stop)."""
    pad_is_eos: bool = False
    """The tokenizer pads with its EOS token; safe here (labels are made per example, padding is by position)."""
    double_bos: int = 0
    """Examples starting with two BOS tokens (a template writing BOS that the tokenizer adds too)."""
    packing: bool = False
    """Examples were packed into sequences of up to ``max_length`` tokens."""
    packed_sequences: int = 0
    """Training sequences after packing."""
    packing_efficiency: float = 0.0
    """Real tokens / (sequences * max_length) after packing."""
    cache_hit: bool = False
    """The tokenized data came from the cache (same rows, tokenizer, template and settings)."""
    streamed: bool = False
    """The rows were streamed (``with_dataset(streaming=True)``): every count is of the rows read while training
    (and, with ``val_split``, the held-out head), not of a whole dataset."""

    @property
    def dropped(self) -> dict[str, int]:
        """Rows dropped or skipped, per reason (reasons with a zero count left out)."""
        reasons = {
            "bad_row": self.skipped_bad_rows,
            "empty_response": self.dropped_empty_response,
            "duplicate": self.dropped_duplicates,
            "too_short": self.dropped_too_short,
            "too_long_chars": self.dropped_too_long_chars,
            "overflow": self.dropped_overflow,
            "no_trainable_tokens": self.dropped_no_trainable_tokens,
        }
        return {reason: count for reason, count in reasons.items() if count}

    def problems(self) -> tuple[list[str], list[str]]:
        """``(fatal, warnings)``: fatal problems stop ``train()`` with a DataError."""
        fatal, warnings = [], []
        if self.trained_tokens == 0:
            fatal.append("no training token carries loss: there is nothing to learn.")
        if self.assistant_turns and self.turns_ending_with_eot == 0:
            fatal.append(
                f"no trained span of the {self.assistant_turns} ends with an end-of-turn / EOS token, so the "
                "model never learns to stop. Use a template whose assistant part ends with {eos} or an "
                "end-of-turn marker."
            )
        elif self.turns_missing_eot:
            warnings.append(
                f"{self.turns_missing_eot} of {self.assistant_turns} trained spans do not end with an "
                "end-of-turn / EOS token (not counting spans cut by max_length)."
            )
        if self.double_bos:
            warnings.append(
                f"{self.double_bos} examples start with two BOS tokens: the template writes BOS and the "
                "tokenizer adds one too. Remove {bos} from the template."
            )
        cut = self.truncated + self.dropped_overflow + self.dropped_no_trainable_tokens
        if cut:
            warnings.append(
                f"{cut} examples were cut or dropped at max_length={self.max_length} "
                f"({self.truncated} truncated, {self.truncated_response} lost the end of their reply, "
                f"{self.dropped_overflow + self.dropped_no_trainable_tokens} dropped). Raise max_length to keep more."
            )
        if self.skipped_bad_rows:
            warnings.append(
                f"{self.skipped_bad_rows} bad rows skipped (on_bad_row='skip'), e.g. {self.bad_row_examples[0]}"
            )
        return fatal, warnings

    def raise_if_fatal(self) -> None:
        """Raise DataError listing the fatal problems, if any."""
        fatal, _ = self.problems()
        if fatal:
            raise DataError(f"The data audit of {self.source} failed:\n  - " + "\n  - ".join(fatal))

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-serialisable dict, with ``dropped`` per reason."""
        data = attrs.asdict(self)
        data["bad_row_examples"] = list(self.bad_row_examples)
        data["dropped"] = self.dropped
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataReport:
        """Rebuild a report from :meth:`to_dict` output."""
        fields = {a.name for a in attrs.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        values["bad_row_examples"] = tuple(values.get("bad_row_examples", ()))
        return cls(**values)

    def summary(self) -> str:
        """A few lines for a terminal, e.g. ``900 train / 100 val rows (alpaca, 1,000 loaded)``."""
        lines = [
            f"{self.train_rows:,} train / {self.val_rows:,} val rows "
            f"({self.format}, {self.rows_loaded:,} loaded from {self.source})",
            f"{self.train_tokens:,} train tokens, {self.trained_tokens:,} trained",
        ]
        if self.streamed:  # counts of the rows read so far, not of a dataset
            lines[0] = (
                f"streamed: {self.train_rows:,} train examples / {self.val_rows:,} val rows so far "
                f"({self.format}, {self.rows_loaded:,} rows read from {self.source})"
            )
        if self.token_lengths:
            q = self.token_lengths
            lines.append(
                f"tokens per example: p50 {q['p50']:g}, p90 {q['p90']:g}, p99 {q['p99']:g}, max {q['max']:g}"
            )
        if self.truncated:
            lines.append(
                f"{self.truncated:,} rows cut to max_length={self.max_length}"
                + (
                    f" ({self.truncated_response:,} lost the end of their reply)"
                    if self.truncated_response
                    else ""
                )
            )
        reasons = {
            "bad_row": "skipped: bad row",
            "empty_response": "dropped: empty reply",
            "duplicate": "dropped: exact duplicate",
            "too_short": "dropped: shorter than min_chars",
            "too_long_chars": "dropped: longer than max_chars",
            "overflow": f"dropped: longer than max_length={self.max_length} (on_overflow='drop')",
            "no_trainable_tokens": f"dropped: no reply token left within max_length={self.max_length}",
        }
        for reason, count in self.dropped.items():
            lines.append(f"{count:,} rows {reasons[reason]}")
        if self.assistant_turns:
            lines.append(
                f"{self.turns_ending_with_eot:,} of {self.assistant_turns:,} trained turns end with a trained "
                "end-of-turn token"
            )
        if self.packing:
            lines.append(
                f"packed into {self.packed_sequences:,} sequences ({self.packing_efficiency:.0%} full)"
            )
        if self.cache_hit:
            lines.append("tokenized data loaded from the cache")
        return "\n".join(lines)


@attrs.frozen
class PreparedData:
    """Tokenized datasets ready for the trainer."""

    train: Dataset
    """Columns ``input_ids`` and ``labels`` (and ``seq_lengths`` when packed)."""
    val: Dataset | None
    """Same columns; None without a validation split."""
    report: DataReport
    """What was kept, cut and dropped."""


def prepare_data(
    source: Any,
    *,
    tokenizer: Any,
    template: str | PromptTemplate,
    val_split: float = 0.1,
    max_length: int = 1024,
    seed: int = 42,
    train_on_inputs: bool = False,
    val_source: Any = None,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    on_overflow: str = "truncate_prompt",
    on_bad_row: str = "error",
    dedup: bool = True,
    min_chars: int | None = None,
    max_chars: int | None = None,
    text_unit: str = "line",
    packing: bool = False,
    num_proc: int | None = None,
    cache: bool | str | Path = True,
) -> PreparedData:
    """Load, clean, split, tokenize (and optionally pack) a dataset, counting everything on the way.

    Args:
        source: a file, directory, Hub id, list of dicts, DataFrame or Dataset (see :mod:`lorakit.data.load`).
        tokenizer: a ``transformers`` tokenizer.
        template: a template name, Jinja string or object (see :mod:`lorakit.templates`).
        val_split: fraction of rows held out for validation, in ``[0, 1)``; 0 for none.
        max_length: the longest tokenized example.
        seed: seed of the split.
        train_on_inputs: put labels on prompt tokens too.
        val_source: a separate validation source (same options); overrides ``val_split``.
        format: the row format; detected from the columns when None.
        columns: ``{lorakit field: your column}``, e.g. ``{"instruction": "question", "output": "answer"}``.
        on_overflow: ``"truncate_prompt"`` | ``"truncate"`` | ``"drop"`` | ``"error"`` (see
            :func:`lorakit.data.encode`).
        on_bad_row: ``"error"`` raises on the first bad row; ``"skip"`` skips and counts bad rows.
        dedup: drop rows that are exact duplicates of an earlier row.
        min_chars: drop rows whose text (all messages) is shorter.
        max_chars: drop rows whose text (all messages) is longer.
        text_unit: plain-text files: one document per ``"line"`` or per ``"file"``.
        packing: pack examples into sequences of up to ``max_length`` tokens (column ``seq_lengths``); use
            :class:`lorakit.collate.PaddingFreeCollator` so packed examples never attend to each other.
        num_proc: tokenize in this many processes.
        cache: reuse tokenized data from an earlier identical call: True (the default cache directory,
            ``$LORAKIT_CACHE_DIR`` or the user cache), a directory, or False.

    Raises:
        DataError: an unreadable source or row (naming file, line / row, field and fix), an example over
            ``max_length`` with ``on_overflow="error"``, or no training row left.
        ConfigError: an invalid option or template.
    """
    template = get_template(template)
    arguments = locals()  # every option by name, checked once in _Options
    options = _Options(**{name: arguments[name] for name in attrs.fields_dict(_Options)})
    train_rows, val_rows, counts = _conversations(
        source, val_split=val_split, seed=seed, val_source=val_source, **options.read_args()
    )
    entry = _cache_entry(cache, train_rows, val_rows, tokenizer, template, options, counts)
    cached = _cache_load(entry) if entry is not None else None
    if cached is not None:
        return cached
    prepared = _tokenize(train_rows, val_rows, counts, tokenizer, template, options)
    if entry is not None:
        _cache_store(entry, prepared)
    return prepared


def count_rows(
    source: Any,
    *,
    val_split: float,
    seed: int,
    val_source: Any = None,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    dedup: bool = True,
    min_chars: int | None = None,
    max_chars: int | None = None,
    text_unit: str = "line",
    **_ignored: Any,
) -> tuple[int, int]:
    """``(train_rows, val_rows)`` before tokenizing, for a plan: cheap, no tokenizer needed.

    Rows with an empty reply, duplicates and rows outside the length filters are already left out; rows
    that the token limit removes are not (that needs the tokenizer), so ``prepare_data`` may report fewer.
    Accepts the keyword arguments of :func:`prepare_data` (tokenizer-side ones are ignored).

    Raises:
        DataError: an unreadable source or row.
    """
    train, val, _ = _conversations(
        source,
        val_split=val_split,
        seed=seed,
        val_source=val_source,
        format=format,
        columns=columns,
        on_bad_row=on_bad_row,
        dedup=dedup,
        min_chars=min_chars,
        max_chars=max_chars,
        text_unit=text_unit,
    )
    return len(train), len(val)


def split_indices(n_rows: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic ``(train, val)`` row indices, each in ascending order.

    ``round(n_rows * val_split)`` rows go to validation, at least one when ``val_split > 0`` and at least
    one row always stays in training.
    """
    _check_val_split(val_split)
    if val_split == 0 or n_rows < 2:
        return list(range(n_rows)), []
    n_val = min(max(1, int(n_rows * val_split + 0.5)), n_rows - 1)
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def pack(examples: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack ``(input_ids, labels)`` examples into rows of at most ``max_length`` tokens (first-fit decreasing).

    Each row holds ``input_ids``, ``labels`` and ``seq_lengths`` (the length of each example in it). The first
    label of every example is set to :data:`~lorakit.data.IGNORE_INDEX`: nothing predicts an example's first
    token (unpacked, it is shifted out), and packed it would otherwise be predicted from the previous example.
    Order is deterministic: examples go longest first (ties in data order) into the first row with room; the
    examples of a row keep data order. O(n log n): the first row with room is found in a max-tree of the rows'
    free space (:func:`first_fit_bins`).
    """
    bins = first_fit_bins([len(ids) for ids, _ in examples], max_length)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for index in sorted(members):
            example_ids, example_labels = examples[index]
            ids.extend(example_ids)
            labels.extend([IGNORE_INDEX, *example_labels[1:]])
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "seq_lengths": [len(examples[i][0]) for i in sorted(members)],
            }
        )
    return rows


def first_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``lengths`` in bins of at most ``capacity`` (bins in opening order).

    The bins' free space sits in the leaves of a binary max-tree (one leaf per bin that may ever open, at most
    ``len(lengths)``); the first bin with room is found by walking down from the root, left child first, so each
    example costs O(log n) instead of a scan over all open bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [capacity] * (
        2 * size
    )  # leaves size..2*size-1: free space of bin (leaf - size); unopened = full room
    bins: list[list[int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:  # fits nowhere: a row of its own, as a scan over the open bins would do
            node = size + len(bins)
        else:
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(index)
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def cache_dir(cache: bool | str | Path | None = True) -> Path | None:
    """The directory tokenized data is cached in: ``$LORAKIT_CACHE_DIR``, else the user cache; None if off."""
    if cache is False or cache is None:
        return None
    if cache is not True:
        return Path(cache).expanduser()
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"]).expanduser() / "data"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lorakit")) / "data"


# --- steps ------------------------------------------------------------------------------------------------

_Row = tuple[str, list[dict[str, Any]]]  # (where, messages)
_Located = list[tuple[str, Encoded]]  # encoded rows with their locations


def _check_val_split(val_split: Any) -> None:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
        raise ConfigError(f"`val_split` must be in [0, 1), got {val_split!r}. Use e.g. 0.1, or 0 for none.")


def _check_format(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and value not in FORMATS:
        raise ConfigError(f"`format` must be one of {', '.join(FORMATS)} or None (detect), got {value!r}.")


def _check_on_bad_row(instance: Any, attribute: Any, value: Any) -> None:
    if value not in BAD_ROW_POLICIES:
        raise ConfigError(f"`on_bad_row` must be 'error' or 'skip', got {value!r}.")


def _check_num_proc(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"`num_proc` must be a positive integer or None, got {value!r}.")


def _check_chars(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"`{attribute.name}` must be a non-negative integer or None, got {value!r}.")


@attrs.frozen
class _Options:
    """The options of :func:`prepare_data`, checked in this order when built."""

    max_length: int = attrs.field(validator=lambda _i, _a, value: _check_max_length(value))
    on_overflow: str = attrs.field(validator=lambda _i, _a, value: check_overflow(value))
    format: str | None = attrs.field(validator=_check_format)
    on_bad_row: str = attrs.field(validator=_check_on_bad_row)
    num_proc: int | None = attrs.field(validator=_check_num_proc)
    min_chars: int | None = attrs.field(validator=_check_chars)
    max_chars: int | None = attrs.field(validator=_check_chars)
    columns: Mapping[str, str] | None
    dedup: bool
    text_unit: str
    train_on_inputs: bool
    packing: bool
    val_split: float
    val_source: Any = attrs.field(repr=False, eq=False)  # a DataFrame or Dataset: not compared

    def read_args(self) -> dict[str, Any]:
        """The keyword arguments of :func:`_read`."""
        names = ("format", "columns", "on_bad_row", "dedup", "min_chars", "max_chars", "text_unit")
        return {name: getattr(self, name) for name in names}

    def encode_args(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Encoder.fit`."""
        return {
            "max_length": self.max_length,
            "train_on_inputs": self.train_on_inputs,
            "on_overflow": self.on_overflow,
        }

    def cache_settings(self) -> dict[str, Any]:
        """The token-side settings in the cache key."""
        return {**self.encode_args(), "packing": self.packing}


def _tokenize(
    train_rows: list[_Row],
    val_rows: list[_Row],
    counts: dict[str, Any],
    tokenizer: Any,
    template: PromptTemplate,
    options: _Options,
) -> PreparedData:
    """Render and tokenize both splits, apply the overflow policy, audit, and build the datasets."""
    encoder = Encoder(tokenizer)
    train_encoded, bad_train = _encode(
        encoder, train_rows, template, options.encode_args(), options.on_bad_row, options.num_proc
    )
    val_encoded, bad_val = _encode(
        encoder, val_rows, template, options.encode_args(), options.on_bad_row, options.num_proc
    )
    counts["skipped_bad_rows"] += len(bad_train) + len(bad_val)
    counts["bad_row_examples"] = (counts["bad_row_examples"] + bad_train + bad_val)[:_EXAMPLES_KEPT]
    n_overflow = _apply_overflow_policy(
        [*train_encoded, *val_encoded], options.max_length, options.on_overflow
    )
    train_kept, val_kept = _trainable(train_encoded), _trainable(val_encoded)
    every = [e for _, e in [*train_encoded, *val_encoded] if not e.overflow]
    report = _report(counts, every, train_kept, val_kept, n_overflow, tokenizer, template, options)
    _check_rows_left(report, n_val=len(val_kept))
    return _datasets(train_kept, val_kept, report, options)


def _apply_overflow_policy(encoded: _Located, max_length: int, on_overflow: str) -> int:
    """How many examples are over ``max_length``; with ``on_overflow="error"`` any is a DataError."""
    overflow = [(where, e) for where, e in encoded if e.overflow]
    if overflow and on_overflow == "error":
        where, first = overflow[0]
        raise DataError(
            f"{where}: {first.length_before} tokens, over max_length={max_length} "
            f"({len(overflow)} example(s) are too long). Raise max_length, or pass "
            "on_overflow='truncate_prompt' / 'truncate' / 'drop'."
        )
    return len(overflow)


def _trainable(encoded: _Located) -> list[Encoded]:
    """The examples kept: within ``max_length`` (or cut to it) and with at least one trained token."""
    return [e for _, e in encoded if not e.overflow and e.has_trainable_tokens]


def _report(
    counts: dict[str, Any],
    every: list[Encoded],
    train_kept: list[Encoded],
    val_kept: list[Encoded],
    n_overflow: int,
    tokenizer: Any,
    template: PromptTemplate,
    options: _Options,
) -> DataReport:
    """The :class:`DataReport`: the counts so far, the token-side counts and the audit."""
    return DataReport(
        source=counts["source"],
        format=counts["format"],
        max_length=options.max_length,
        rows_loaded=counts["rows_loaded"],
        dropped_empty_response=counts["dropped_empty_response"],
        truncated=sum(e.truncated and e.has_trainable_tokens for e in every),
        truncated_response=sum(e.reply_cut and e.has_trainable_tokens for e in every),
        dropped_no_trainable_tokens=sum(not e.has_trainable_tokens for e in every),
        train_rows=len(train_kept),
        val_rows=len(val_kept),
        train_tokens=sum(len(e.input_ids) for e in train_kept),
        trained_tokens=sum(e.n_trained_tokens for e in train_kept),
        skipped_bad_rows=counts["skipped_bad_rows"],
        bad_row_examples=tuple(counts["bad_row_examples"]),
        skipped_blank_lines=counts["skipped_blank_lines"],
        stripped_rows=counts["stripped"],
        nfc_normalized_rows=counts["nfc_normalized"],
        dropped_duplicates=counts["dropped_duplicates"],
        dropped_too_short=counts["dropped_too_short"],
        dropped_too_long_chars=counts["dropped_too_long_chars"],
        dropped_overflow=n_overflow,
        on_overflow=options.on_overflow,
        **_audit(train_kept + val_kept, train_kept, tokenizer, template),
    )


def _check_rows_left(report: DataReport, *, n_val: int) -> None:
    if report.train_rows == 0:
        raise DataError(
            f"No training rows left from {report.source}: {report.rows_loaded} loaded, "
            f"{report.dropped_empty_response} with an empty reply, "
            f"{report.dropped_no_trainable_tokens} with no reply token within max_length={report.max_length}, "
            f"{report.dropped_overflow} over max_length dropped, {report.dropped_duplicates} duplicates, "
            f"{report.skipped_bad_rows} bad rows skipped, {n_val} in validation. Raise max_length, "
            "fix the replies, or lower val_split."
        )


def _datasets(
    train_kept: list[Encoded], val_kept: list[Encoded], report: DataReport, options: _Options
) -> PreparedData:
    """The train / validation datasets (packed if asked), and the report with the packing numbers."""
    max_length = options.max_length
    train_set = _to_dataset(train_kept, packing=options.packing, max_length=max_length)
    use_val = options.val_source is not None or options.val_split > 0
    val_set = (
        _to_dataset(val_kept, packing=options.packing, max_length=max_length)
        if use_val and val_kept
        else None
    )
    if options.packing:
        report = attrs.evolve(
            report,
            packing=True,
            packed_sequences=len(train_set),
            packing_efficiency=round(report.train_tokens / (len(train_set) * max_length), 4),
        )
    return PreparedData(train=train_set, val=val_set, report=report)


def new_counts() -> dict[str, Any]:
    """The row counts reading and cleaning fill in (the in-memory and the streamed path share them)."""
    return {
        "rows_loaded": 0,
        "skipped_bad_rows": 0,
        "bad_row_examples": [],
        "skipped_blank_lines": 0,
        "stripped": 0,
        "nfc_normalized": 0,
        "dropped_empty_response": 0,
        "dropped_duplicates": 0,
        "dropped_too_short": 0,
        "dropped_too_long_chars": 0,
    }


def _conversations(
    source: Any, *, val_split: float, seed: int, val_source: Any, **options: Any
) -> tuple[list[_Row], list[_Row], dict[str, Any]]:
    """Cleaned train and validation conversations (each with its location), and the counts so far."""
    _check_val_split(val_split)
    counts = new_counts()
    kept, label, fmt = _read(source, counts, **options)
    counts["source"], counts["format"] = label, fmt
    if val_source is not None:
        val_kept, _, _ = _read(val_source, counts, **options)
        return kept, val_kept, counts
    train_idx, val_idx = split_indices(len(kept), val_split, seed)
    return [kept[i] for i in train_idx], [kept[i] for i in val_idx], counts


def _read(
    source: Any,
    counts: dict[str, Any],
    *,
    format: str | None,
    columns: Mapping[str, str] | None,
    on_bad_row: str,
    dedup: bool,
    min_chars: int | None,
    max_chars: int | None,
    text_unit: str,
) -> tuple[list[_Row], str, str]:
    """The cleaned conversations of one source, its label and its row format."""
    read = read_source(source, text_unit=text_unit)
    rows = rename_columns(read.rows, columns, source_name=read.label)
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row))
    fmt: Format = format or detect_format(present)  # type: ignore[assignment]  # checked by _Options
    counts["rows_loaded"] += len(rows)
    counts["skipped_blank_lines"] += read.skipped_blank
    conversations = _convert(read, rows, fmt, counts, on_bad_row=on_bad_row)
    kept = _filter(conversations, counts, dedup=dedup, min_chars=min_chars, max_chars=max_chars)
    return kept, read.label, fmt


def _convert(
    read: Any, rows: list[dict[str, Any]], fmt: Format, counts: dict[str, Any], *, on_bad_row: str
) -> list[_Row]:
    """Each row as messages with its location; a bad row raises, or is skipped and counted."""
    conversations: list[_Row] = []
    for index, row in enumerate(rows):
        line = read.lines[index] if read.lines is not None else None
        try:
            messages = to_messages(
                row,
                fmt,
                row_index=index + read.first_row,
                source_name=read.label,
                line=line,
                stats=counts,  # type: ignore[arg-type]
            )
        except DataError as error:
            if on_bad_row == "error":
                raise
            counts["skipped_bad_rows"] += 1
            counts["bad_row_examples"].append(str(error))
            continue
        conversations.append((read.where(index), messages))
    return conversations


def _filter(
    conversations: list[_Row],
    counts: dict[str, Any],
    *,
    dedup: bool,
    min_chars: int | None,
    max_chars: int | None,
    seen: set[bytes] | None = None,
) -> list[_Row]:
    """Drop (and count) empty replies, exact duplicates and rows outside the character limits; ``seen`` holds
    the rows met so far (a stream passes its own, kept across chunks)."""
    seen = set() if seen is None else seen
    kept: list[_Row] = []
    for where, messages in conversations:
        if not _has_replies(messages):
            counts["dropped_empty_response"] += 1
            continue
        if dedup:
            # 16 bytes per row met, not its text: a stream's memory stays small.
            text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            fingerprint = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if fingerprint in seen:
                counts["dropped_duplicates"] += 1
                continue
            seen.add(fingerprint)
        chars = sum(len(m["content"]) + len(m.get("input") or "") for m in messages)
        if min_chars is not None and chars < min_chars:
            counts["dropped_too_short"] += 1
            continue
        if max_chars is not None and chars > max_chars:
            counts["dropped_too_long_chars"] += 1
            continue
        kept.append((where, messages))
    return kept


def _has_replies(messages: Sequence[dict[str, Any]]) -> bool:
    return all(m["content"] for m in messages if m["role"] in ("assistant", TEXT_ROLE))


def _encode(
    encoder: Encoder,
    rows: list[_Row],
    template: PromptTemplate,
    encode_args: dict[str, Any],
    on_bad_row: str,
    num_proc: int | None,
) -> tuple[list[tuple[str, Encoded]], list[str]]:
    """Encoded rows with their locations, and the reasons of rows skipped for failing to render."""
    if num_proc is not None and num_proc > 1 and len(rows) > num_proc:
        return _encode_parallel(encoder, rows, template, encode_args, on_bad_row, num_proc)
    rendered = []
    bad: list[str] = []
    for where, messages in rows:
        try:
            rendered.append((where, encoder.render(messages, template)))
        except LorakitError as error:
            message = f"{where}: the template {template.name!r} cannot render this conversation: {error}"
            if on_bad_row == "error":
                raise DataError(
                    message + " Fix the row, pick another template, or on_bad_row='skip'."
                ) from error
            bad.append(message)
    flat = encoder.tokenize([text for _, segments in rendered for text, _ in segments])
    encoded = []
    offset = 0
    for where, segments in rendered:
        ids, trained = encoder.join(segments, flat[offset : offset + len(segments)])
        offset += len(segments)
        encoded.append((where, encoder.fit(ids, trained, **encode_args)))
    return encoded, bad


def _encode_parallel(
    encoder: Encoder,
    rows: list[_Row],
    template: PromptTemplate,
    encode_args: dict[str, Any],
    on_bad_row: str,
    num_proc: int,
) -> tuple[list[tuple[str, Encoded]], list[str]]:
    from datasets import Dataset

    def work(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        chunk = [(w, json.loads(m)) for w, m in zip(batch["where"], batch["messages"], strict=True)]
        try:
            done, bad = _encode(encoder, chunk, template, encode_args, on_bad_row, None)
        except DataError as error:
            return {"result": [json.dumps({"error": str(error)})]}
        results = [json.dumps({"where": w, "encoded": attrs.asdict(e)}) for w, e in done]
        return {"result": results + [json.dumps({"bad": b}) for b in bad]}

    table = Dataset.from_dict(
        {"where": [w for w, _ in rows], "messages": [json.dumps(m, ensure_ascii=False) for _, m in rows]}
    )
    out = table.map(
        work,
        batched=True,
        batch_size=max(1, -(-len(rows) // num_proc)),
        num_proc=num_proc,
        remove_columns=table.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        new_fingerprint=hashlib.sha256(os.urandom(16)).hexdigest()[
            :16
        ],  # lorakit caches; skip hashing `work`
        desc="lorakit: tokenizing",
    )
    encoded: list[tuple[str, Encoded]] = []
    bad: list[str] = []
    for item in out["result"]:
        result = json.loads(item)
        if "error" in result:
            raise DataError(result["error"])
        if "bad" in result:
            bad.append(result["bad"])
            continue
        fields = result["encoded"]
        fields["spans"] = tuple(tuple(span) for span in fields["spans"])
        encoded.append((result["where"], Encoded(**fields)))
    return encoded, bad


def _audit(
    kept: list[Encoded], train: list[Encoded], tokenizer: Any, template: PromptTemplate
) -> dict[str, Any]:
    """The audit numbers of :class:`DataReport` for the kept examples."""
    stops = [s for s in (*template.stop_strings(tokenizer), tokenizer.eos_token) if s]
    turns = ending = missing = 0
    for example in kept:
        for start, end in example.spans:
            turns += 1
            text = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=False).rstrip()
            if any(text.endswith(stop) for stop in stops):
                ending += 1
            elif not (example.end_cut and end == len(example.input_ids)):
                missing += 1
    lengths = sorted(len(e.input_ids) for e in train)
    trained = [e.n_trained_tokens for e in train]
    bos = tokenizer.bos_token_id
    return {
        "token_lengths": _quantiles(lengths),
        "trained_per_example": (
            {"min": min(trained), "mean": round(sum(trained) / len(trained), 2), "max": max(trained)}
            if trained
            else {}
        ),
        "assistant_turns": turns,
        "turns_ending_with_eot": ending,
        "turns_missing_eot": missing,
        "pad_is_eos": tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id,
        "double_bos": sum(bos is not None and e.input_ids[:2] == [bos, bos] for e in kept),
    }


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}

    def at(q: float) -> float:
        return float(values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))])

    return {
        "min": float(values[0]),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": float(values[-1]),
    }


def _to_dataset(rows: list[Encoded], *, packing: bool, max_length: int) -> Dataset:
    from datasets import Dataset, Features, List, Value

    if packing:
        packed = pack([(e.input_ids, e.labels) for e in rows], max_length)
        features = Features(
            {
                "input_ids": List(Value("int64")),
                "labels": List(Value("int64")),
                "seq_lengths": List(Value("int64")),
            }
        )
        return Dataset.from_dict(
            {key: [row[key] for row in packed] for key in ("input_ids", "labels", "seq_lengths")},
            features=features,
        )
    features = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in rows], "labels": [e.labels for e in rows]}, features=features
    )


# --- cache ------------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    parts = [type(tokenizer).__name__]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items())))
    parts.append(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str))
    parts.append(str(getattr(tokenizer, "chat_template", None)))
    parts.append(str(getattr(tokenizer, "add_bos_token", None)))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _cache_entry(
    cache: bool | str | Path,
    train: list[_Row],
    val: list[_Row],
    tokenizer: Any,
    template: PromptTemplate,
    options: _Options,
    counts: dict[str, Any],
) -> Path | None:
    """The cache directory of this exact call (rows, tokenizer, template, settings); None with caching off."""
    directory = cache_dir(cache)
    if directory is None:
        return None
    digest = hashlib.sha256()
    settings = options.cache_settings()
    digest.update(
        json.dumps([CACHE_VERSION, __version__, settings, counts], sort_keys=True, default=str).encode()
    )
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps(template.to_dict(), sort_keys=True, default=repr).encode())
    for rows in (train, val):
        digest.update(b"\x01")
        for where, messages in rows:
            digest.update(json.dumps([where, messages], sort_keys=True, ensure_ascii=False).encode())
    return directory / digest.hexdigest()[:32]


def _cache_load(path: Path) -> PreparedData | None:
    """The cached result at ``path``; None when there is none, or the entry is partial or stale.

    A partial entry (a file cut short or missing) or a stale one (written by another lorakit or datasets
    version) raises one of :data:`_STALE_CACHE_ERRORS` and is recomputed; any other error propagates.
    """
    if not (path / "report.json").is_file():
        return None
    from datasets import load_from_disk

    try:
        raw = json.loads((path / "report.json").read_text())
        if not isinstance(raw, dict):
            return None
        report = DataReport.from_dict(raw)
        train = load_from_disk(str(path / "train"))
        val = load_from_disk(str(path / "val")) if (path / "val").is_dir() else None
    except _STALE_CACHE_ERRORS:
        return None
    return PreparedData(train=train, val=val, report=attrs.evolve(report, cache_hit=True))


_STALE_CACHE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError)
"""What reading a partial or stale cache entry raises: a missing file (FileNotFoundError), a file cut short
(json.JSONDecodeError, UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors), a datasets
``state.json`` without a key it needs (KeyError) or of another shape (TypeError), a report without a field
this version needs (TypeError). Anything else (a bug, MemoryError, KeyboardInterrupt) propagates."""


def _cache_store(path: Path, prepared: PreparedData) -> None:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not are_progress_bars_disabled()
    try:
        if quiet:
            disable_progress_bars()
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        prepared.train.save_to_disk(str(staging / "train"))
        if prepared.val is not None:
            prepared.val.save_to_disk(str(staging / "val"))
        (staging / "report.json").write_text(json.dumps(prepared.report.to_dict()))
        if path.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return
        staging.rename(path)
    except OSError:  # a read-only or full disk must not stop training
        return
    finally:
        if quiet:
            enable_progress_bars()

"""From a source to tokenized train / validation sets, with a report of everything kept, cut or dropped."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.data.encode import Encoded, Encoder, _check_max_length
from lorakit.data.formats import detect_format, to_messages
from lorakit.data.load import load_rows
from lorakit.errors import ConfigError, DataError
from lorakit.templates import PromptTemplate, get_template

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["DataReport", "PreparedData", "count_rows", "prepare_data", "split_indices"]


@attrs.frozen
class DataReport:
    """What data preparation kept, cut and dropped. Every row and every cut is counted here."""

    source: str
    """The training source, as error messages name it."""
    format: str
    """The detected row format: ``alpaca``, ``prompt_completion`` or ``messages``."""
    max_length: int
    """The token limit rows were cut to."""
    rows_loaded: int
    """Rows read (training source plus ``val_source``, if any)."""
    dropped_empty_response: int
    """Rows dropped because a reply was empty (after stripping whitespace)."""
    truncated: int
    """Kept rows that lost tokens to ``max_length`` (prompt tokens from the left, or the reply's end)."""
    truncated_response: int
    """Of those, rows whose final reply lost its end (its EOS / end-of-turn is not trained)."""
    dropped_no_trainable_tokens: int
    """Rows dropped because no trained token survived truncation."""
    train_rows: int
    """Rows in the training set."""
    val_rows: int
    """Rows in the validation set."""
    train_tokens: int
    """Tokens in the training set."""
    trained_tokens: int
    """Training-set tokens that carry loss."""

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-serialisable dict."""
        return attrs.asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal, e.g. ``900 train / 100 val rows (alpaca, 1,000 loaded)``."""
        lines = [
            f"{self.train_rows:,} train / {self.val_rows:,} val rows "
            f"({self.format}, {self.rows_loaded:,} loaded from {self.source})",
            f"{self.train_tokens:,} train tokens, {self.trained_tokens:,} trained",
        ]
        if self.truncated:
            lines.append(
                f"{self.truncated:,} rows cut to max_length={self.max_length}"
                + (
                    f" ({self.truncated_response:,} lost the end of their reply)"
                    if self.truncated_response
                    else ""
                )
            )
        if self.dropped_empty_response:
            lines.append(f"{self.dropped_empty_response:,} rows dropped: empty reply")
        if self.dropped_no_trainable_tokens:
            lines.append(
                f"{self.dropped_no_trainable_tokens:,} rows dropped: no reply token left within "
                f"max_length={self.max_length}"
            )
        return "\n".join(lines)


@attrs.frozen
class PreparedData:
    """Tokenized datasets ready for the trainer."""

    train: Dataset
    """Columns ``input_ids`` and ``labels``."""
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
) -> PreparedData:
    """Load, clean, split and tokenize a dataset.

    Steps: load the rows (:func:`lorakit.data.load_source`), convert each to messages with whitespace
    stripped (:func:`lorakit.data.to_messages`), drop rows with an empty reply, split off ``val_split`` of the
    rows with ``seed`` (before tokenizing; an explicit ``val_source`` replaces the split), then tokenize with
    labels on the replies (:func:`lorakit.data.encode`) and drop rows with no trained token left.

    Args:
        source: a .json / .jsonl / .csv path, a list of dicts, or a ``datasets.Dataset``.
        tokenizer: a ``transformers`` tokenizer.
        template: a template name or object (see :mod:`lorakit.templates`).
        val_split: fraction of rows held out for validation, in ``[0, 1)``; 0 for none.
        max_length: the longest tokenized row; longer ones are cut (and counted).
        seed: seed of the split.
        train_on_inputs: put labels on prompt tokens too.
        val_source: a separate validation source; overrides ``val_split``.

    Raises:
        DataError: an unreadable source or row, or no training row left.
        ConfigError: an invalid ``val_split`` / ``max_length`` or template.
    """
    template = get_template(template)
    _check_max_length(max_length)
    train_convs, val_convs, counts = _conversations(
        source, val_split=val_split, seed=seed, val_source=val_source
    )
    encoder = Encoder(tokenizer)
    train_encoded = encoder.encode_many(
        train_convs, template, max_length=max_length, train_on_inputs=train_on_inputs
    )
    val_encoded = encoder.encode_many(
        val_convs, template, max_length=max_length, train_on_inputs=train_on_inputs
    )
    every = train_encoded + val_encoded
    train_kept = [e for e in train_encoded if e.has_trainable_tokens]
    val_kept = [e for e in val_encoded if e.has_trainable_tokens]
    report = DataReport(
        source=counts["source"],
        format=counts["format"],
        max_length=max_length,
        rows_loaded=counts["rows_loaded"],
        dropped_empty_response=counts["dropped_empty_response"],
        truncated=sum(e.truncated and e.has_trainable_tokens for e in every),
        truncated_response=sum(e.reply_cut and e.has_trainable_tokens for e in every),
        dropped_no_trainable_tokens=sum(not e.has_trainable_tokens for e in every),
        train_rows=len(train_kept),
        val_rows=len(val_kept),
        train_tokens=sum(len(e.input_ids) for e in train_kept),
        trained_tokens=sum(e.n_trained_tokens for e in train_kept),
    )
    if not train_kept:
        raise DataError(
            f"No training rows left from {report.source}: {report.rows_loaded} loaded, "
            f"{report.dropped_empty_response} with an empty reply, "
            f"{report.dropped_no_trainable_tokens} with no reply token within max_length={max_length}, "
            f"{len(val_kept)} in validation. Raise max_length, fix the replies, or lower val_split."
        )
    use_val = val_source is not None or val_split > 0
    return PreparedData(
        train=_to_dataset(train_kept),
        val=_to_dataset(val_kept) if use_val and val_kept else None,
        report=report,
    )


def count_rows(source: Any, *, val_split: float, seed: int, val_source: Any = None) -> tuple[int, int]:
    """``(train_rows, val_rows)`` before tokenizing, for a plan: cheap, no tokenizer needed.

    Rows with an empty reply are already left out; rows that truncation empties are not (that needs the
    tokenizer), so ``prepare_data`` may report fewer.

    Raises:
        DataError: an unreadable source or row.
    """
    train, val, _ = _conversations(source, val_split=val_split, seed=seed, val_source=val_source)
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


def _check_val_split(val_split: Any) -> None:
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
        raise ConfigError(f"`val_split` must be in [0, 1), got {val_split!r}. Use e.g. 0.1, or 0 for none.")


def _conversations(
    source: Any, *, val_split: float, seed: int, val_source: Any
) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]], dict[str, Any]]:
    """Train and validation conversations (empty replies dropped), and the counts so far."""
    _check_val_split(val_split)
    conversations, label, fmt = _read(source)
    kept = [c for c in conversations if _has_replies(c)]
    counts: dict[str, Any] = {
        "source": label,
        "format": fmt,
        "rows_loaded": len(conversations),
        "dropped_empty_response": len(conversations) - len(kept),
    }
    if val_source is not None:
        val_conversations, _, _ = _read(val_source)
        val_kept = [c for c in val_conversations if _has_replies(c)]
        counts["rows_loaded"] += len(val_conversations)
        counts["dropped_empty_response"] += len(val_conversations) - len(val_kept)
        return kept, val_kept, counts
    train_idx, val_idx = split_indices(len(kept), val_split, seed)
    return [kept[i] for i in train_idx], [kept[i] for i in val_idx], counts


def _read(source: Any) -> tuple[list[list[dict[str, Any]]], str, str]:
    rows, label = load_rows(source)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    fmt = detect_format(columns)
    conversations = [to_messages(row, fmt, row_index=i, source_name=label) for i, row in enumerate(rows)]
    return conversations, label, fmt


def _has_replies(messages: Sequence[dict[str, Any]]) -> bool:
    return all(m["content"] for m in messages if m["role"] == "assistant")


def _to_dataset(rows: list[Encoded]) -> Dataset:
    from datasets import Dataset, Features, List, Value

    features = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))})
    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in rows], "labels": [e.labels for e in rows]}, features=features
    )

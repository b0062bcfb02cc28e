"""Preference rows, checked and tokenized with the run's template exactly as SFT renders them.

Paired rows (DPO, ORPO, CPO): ``prompt``, ``chosen``, ``rejected``; unpaired rows (KTO): ``prompt``,
``completion``, ``label`` (true: desirable), or paired rows, each unpaired into two (chosen desirable). Each text is a string, or a message list in the conversational
form (``prompt``: user / system / assistant turns ending with a user turn; a completion: one assistant turn).
Every source :func:`lorakit.data.read_source` reads works; ``columns=`` maps other column names.

Each (prompt, completion) is rendered as the conversation ``prompt + [assistant reply]`` by the template and
tokenized by :class:`lorakit.data.encode.Encoder`, the same code SFT uses: ``prompt_ids`` are the untrained
tokens before the reply (they equal :func:`lorakit.data.encode_prompt` of the prompt, checked per row), the
completion's ids are the reply with its end-of-turn, i.e. exactly the tokens SFT would train.

Bad rows (a missing, empty or non-text field, chosen identical to rejected, a non-boolean label, a completion
that ``max_length`` would cut) raise :class:`lorakit.errors.DataError` naming the source, row and field, or are
skipped and counted under ``on_bad_row="skip"``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import attrs

from lorakit.data.encode import IGNORE_INDEX, Encoder, encode_prompt
from lorakit.data.formats import rename_columns
from lorakit.data.load import read_source
from lorakit.data.prepare import PreparedData, split_indices
from lorakit.errors import ConfigError, DataError
from lorakit.templates import get_template

__all__ = [
    "PAIRED_COLUMNS",
    "UNPAIRED_COLUMNS",
    "PreferenceReport",
    "count_preference_rows",
    "preference_sample_path",
    "prepare_preference_data",
    "preview_rows",
]

PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
"""The columns of a tokenized paired preference dataset."""
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")
"""The columns of a tokenized unpaired (KTO) preference dataset."""
_PROMPT_ROLES = ("system", "user", "assistant")
_EXAMPLES_KEPT = 5


@attrs.frozen
class PreferenceReport:
    """What preference data preparation kept and skipped."""

    source: str
    """The training source, as error messages name it."""
    format: str
    """``"paired"`` (prompt / chosen / rejected) or ``"unpaired"`` (prompt / completion / label)."""
    max_length: int
    """The token limit of prompt + completion."""
    rows_loaded: int
    """Rows read (training source plus ``val``, if any)."""
    train_rows: int
    """Rows in the training set."""
    val_rows: int
    """Rows in the validation set."""
    skipped_bad_rows: int = 0
    """Rows skipped under ``on_bad_row="skip"``."""
    bad_row_examples: tuple[str, ...] = ()
    """The first few skip reasons, with source, row and field."""
    prompt_tokens: int = 0
    """Prompt tokens in the training set."""
    completion_tokens: int = 0
    """Completion tokens (chosen and rejected, or completions) in the training set: what the objective scores."""
    longest: int = 0
    """The longest prompt + completion in the training set, in tokens."""

    def summary(self) -> str:
        lines = [
            f"{self.rows_loaded} {self.format} preference rows from {self.source}: {self.train_rows} train, "
            f"{self.val_rows} validation",
            f"{self.prompt_tokens:,} prompt tokens, {self.completion_tokens:,} completion tokens, longest "
            f"{self.longest} of max_length {self.max_length}",
        ]
        if self.skipped_bad_rows:
            lines.append(f"skipped {self.skipped_bad_rows} bad rows (on_bad_row='skip')")
        return "\n".join(lines)

    def problems(self) -> tuple[list[str], list[str]]:
        """(fatal problems, warnings)."""
        warnings = []
        if self.skipped_bad_rows:
            warnings.append(
                f"{self.skipped_bad_rows} bad preference rows were skipped; first: {self.bad_row_examples[0]}"
            )
        return [], warnings

    def raise_if_fatal(self) -> None:
        """Nothing in a preference report is fatal (an empty training set raises while preparing)."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def prepare_preference_data(
    source: Any,
    *,
    tokenizer: Any,
    template: Any,
    paired: bool,
    max_length: int = 1024,
    val_split: float = 0.1,
    seed: int = 42,
    val_source: Any = None,
    columns: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
) -> PreparedData:
    """Read, check, split and tokenize preference rows (see the module docstring).

    Returns a :class:`lorakit.data.PreparedData` whose datasets have :data:`PAIRED_COLUMNS` (``paired=True``)
    or :data:`UNPAIRED_COLUMNS`, and a :class:`PreferenceReport`.

    Raises:
        DataError: a bad row under ``on_bad_row="error"`` (naming source, row and field), or no row left.
    """
    template = get_template(template)
    tokenizer_ = _Tokenizer(tokenizer, template, max_length)
    skipped: list[str] = []
    train_rows, label, loaded = _read(source, columns, paired, tokenizer_, on_bad_row, skipped)
    if val_source is not None:
        val_rows, _, val_loaded = _read(val_source, columns, paired, tokenizer_, on_bad_row, skipped)
        loaded += val_loaded
    else:
        train_idx, val_idx = split_indices(len(train_rows), val_split, seed)
        train_rows, val_rows = [train_rows[i] for i in train_idx], [train_rows[i] for i in val_idx]
    if not train_rows:
        raise DataError(
            f"{label}: no preference row left for training ({len(skipped)} bad rows skipped). "
            + (f"First: {skipped[0]}" if skipped else "Add rows.")
        )
    names = PAIRED_COLUMNS if paired else UNPAIRED_COLUMNS
    completions = names[1:] if paired else names[1:2]
    report = PreferenceReport(
        source=label,
        format="paired" if paired else "unpaired",
        max_length=max_length,
        rows_loaded=loaded,
        train_rows=len(train_rows),
        val_rows=len(val_rows),
        skipped_bad_rows=len(skipped),
        bad_row_examples=tuple(skipped[:_EXAMPLES_KEPT]),
        prompt_tokens=sum(len(row["prompt_ids"]) for row in train_rows),
        completion_tokens=sum(len(row[name]) for row in train_rows for name in completions),
        longest=max(len(row["prompt_ids"]) + max(len(row[n]) for n in completions) for row in train_rows),
    )
    return PreparedData(train=_dataset(train_rows, names), val=_dataset(val_rows, names), report=report)  # type: ignore[arg-type]


def preference_sample_path(split: str) -> Path:
    """Path of the bundled preference sample (``"train"``: 240 rows, ``"test"``: 90 held-out rows): support
    tickets, polite correct routing (chosen) vs curt or wrong (rejected); see scripts/make_preference_data.py."""
    if split not in ("train", "test"):
        raise ConfigError(f"preference_sample_path(split) takes 'train' or 'test', got {split!r}.")
    return Path(str(files("lorakit") / "samples" / f"support_prefs_{split}.jsonl"))


def count_preference_rows(
    source: Any,
    *,
    val_split: float,
    seed: int,
    val_source: Any = None,
    paired: bool = True,
    columns: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """(train rows, validation rows) as :func:`prepare_preference_data` would split them, before the row checks
    (read only, nothing tokenized). For an unpaired objective (``paired=False``, KTO) a paired row counts as the
    two rows it is unpaired into, as training sees them."""
    rows = _count(source, paired, columns)
    if val_source is not None:
        return rows, _count(val_source, paired, columns)
    train_idx, val_idx = split_indices(rows, val_split, seed)
    return len(train_idx), len(val_idx)


def _count(source: Any, paired: bool, columns: Mapping[str, str] | None) -> int:
    """Rows of one source as training sees them: a paired row unpaired for KTO counts twice."""
    read = read_source(source)
    if paired:
        return len(read.rows)
    rows = rename_columns(read.rows, columns, source_name=read.label)
    return sum(2 if _is_pair(row) else 1 for row in rows)


def preview_rows(dataset: Any, n: int) -> list[dict[str, list[int]]]:
    """The first ``n`` rows as ``input_ids`` / ``labels`` (completion tokens trained): chosen then rejected
    of each pair, for :func:`lorakit.data.preview_examples`."""
    rows = []
    for row in dataset.select(range(min(n, len(dataset)))).to_list():
        prompt = list(row["prompt_ids"])
        sides = ("chosen_ids", "rejected_ids") if "chosen_ids" in row else ("completion_ids",)
        for side in sides:
            completion = list(row[side])
            rows.append(
                {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
            )
    return rows


# --- reading and checking -------------------------------------------------------------------------------


class _BadRow(Exception):
    """A row's problem, before the source and row are named (turned into a DataError)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")


def _read(
    source: Any,
    columns: Mapping[str, str] | None,
    paired: bool,
    tokenizer: _Tokenizer,
    on_bad_row: str,
    skipped: list[str],
) -> tuple[list[dict[str, Any]], str, int]:
    """The tokenized good rows of one source, its label and the rows read."""
    read = read_source(source)
    rows = rename_columns(read.rows, columns, source_name=read.label)
    kept = []
    for index, row in enumerate(rows):
        try:
            kept.extend([_paired(row, tokenizer)] if paired else _unpaired(row, tokenizer))
        except _BadRow as problem:
            error = DataError(f"{read.where(index)}: {problem}")
            if on_bad_row == "error":
                raise error from None
            skipped.append(str(error))
    return kept, read.label, len(rows)


def _paired(row: Mapping[str, Any], tokenizer: _Tokenizer) -> dict[str, Any]:
    _check_columns(row, ("prompt", "chosen", "rejected"), "paired rows (DPO, ORPO, CPO)")
    prompt = _prompt(row["prompt"])
    chosen, rejected = _completion(row, "chosen"), _completion(row, "rejected")
    if chosen == rejected:
        raise _BadRow(
            "rejected", "is identical to 'chosen': the pair teaches no preference. Fix or drop the row"
        )
    prompt_ids, chosen_ids = tokenizer.encode(prompt, chosen, "chosen")
    _, rejected_ids = tokenizer.encode(prompt, rejected, "rejected")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def _unpaired(row: Mapping[str, Any], tokenizer: _Tokenizer) -> list[dict[str, Any]]:
    """One KTO row, or two from a paired row (chosen desirable, rejected not), as TRL unpairs them."""
    if _is_pair(row):
        pair = _paired(row, tokenizer)
        return [
            {
                "prompt_ids": pair["prompt_ids"],
                "completion_ids": pair[f"{side}_ids"],
                "label": side == "chosen",
            }
            for side in ("chosen", "rejected")
        ]
    return [_unpaired_row(row, tokenizer)]


def _is_pair(row: Mapping[str, Any]) -> bool:
    """A paired row given to an unpaired objective (unpaired into two rows)."""
    return "completion" not in row and "chosen" in row and "rejected" in row


def _unpaired_row(row: Mapping[str, Any], tokenizer: _Tokenizer) -> dict[str, Any]:
    _check_columns(row, ("prompt", "completion", "label"), "unpaired rows (KTO)")
    label = row["label"]
    if not isinstance(label, bool):
        raise _BadRow("label", f"must be true (desirable) or false (undesirable), got {label!r}")
    prompt_ids, completion_ids = tokenizer.encode(
        _prompt(row["prompt"]), _completion(row, "completion"), "completion"
    )
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label}


def _check_columns(row: Mapping[str, Any], fields: tuple[str, ...], kind: str) -> None:
    for field in fields:
        if field not in row or row[field] is None:
            raise _BadRow(
                field,
                f"is missing; {kind} need {', '.join(fields)} (fields present: {sorted(row)}). Map your columns "
                "with with_dataset(columns={...})",
            )


def _clean(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise _BadRow(field, f"must be text, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text.strip())  # as SFT data preparation cleans text
    if not text:
        raise _BadRow(field, "is empty")
    return text


def _prompt(value: Any) -> list[dict[str, str]]:
    """The prompt as messages ending with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _clean(value, "prompt")}]
    messages = _messages(value, "prompt", _PROMPT_ROLES)
    if messages[-1]["role"] != "user":
        raise _BadRow("prompt", f"must end with a user turn, got a {messages[-1]['role']!r} turn last")
    return messages


def _completion(row: Mapping[str, Any], field: str) -> str:
    """A completion's text: a string, or a message list holding one assistant turn."""
    value = row[field]
    if isinstance(value, str):
        return _clean(value, field)
    messages = _messages(value, field, ("assistant",))
    if len(messages) != 1:
        raise _BadRow(field, f"must hold one assistant turn, got {len(messages)}")
    return messages[0]["content"]


def _messages(value: Any, field: str, roles: Sequence[str]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _BadRow(field, f"must be text or a non-empty list of {{role, content}} messages, got {value!r}")
    messages = []
    for turn in value:
        if not isinstance(turn, Mapping) or turn.get("role") not in roles:
            raise _BadRow(
                field, f"has a message {turn!r}; each must be {{role, content}} with role in {list(roles)}"
            )
        messages.append({"role": turn["role"], "content": _clean(turn.get("content"), field)})
    return messages


class _Tokenizer:
    """Renders (prompt, completion) with the template and tokenizes it as SFT does."""

    def __init__(self, tokenizer: Any, template: Any, max_length: int) -> None:
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.encoder = Encoder(tokenizer)

    def encode(
        self, prompt: list[dict[str, str]], completion: str, field: str
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids): the SFT encoding of ``prompt + [reply]`` up to the reply's last trained
        token, split where the reply starts."""
        segments = self.encoder.render([*prompt, {"role": "assistant", "content": completion}], self.template)
        ids, trained = self.encoder.join(segments, self.encoder.tokenize([text for text, _ in segments]))
        prompt_ids = encode_prompt(prompt, self.template, self.tokenizer)
        end = max(i for i, flag in enumerate(trained) if flag) + 1
        if ids[: len(prompt_ids)] != prompt_ids or any(trained[: len(prompt_ids)][-1:]):
            raise _BadRow(
                field,
                f"renders a prompt the template {getattr(self.template, 'name', self.template)!r} does not "
                "reproduce at inference (the generation prompt is not a prefix of the training text)",
            )
        if end > self.max_length:
            raise _BadRow(
                field,
                f"would be cut away by max_length={self.max_length}: prompt and {field} are {end} tokens. Raise "
                "with_dataset(max_length=...), shorten the row, or pass on_bad_row='skip'",
            )
        return prompt_ids, ids[len(prompt_ids) : end]


def _dataset(rows: list[dict[str, Any]], names: tuple[str, ...]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({name: [row[name] for row in rows] for name in names})

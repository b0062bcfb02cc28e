"""The accepted row formats, and their conversion to a list of messages.

- ``alpaca``: ``instruction``, ``output``; optional ``input`` and ``system``.
- ``prompt_completion``: ``prompt``, ``completion``; optional ``system``. Both may also be lists of
  messages (TRL's conversational prompt-completion form).
- ``messages``: ``messages``, a list of ``{"role": "system" | "user" | "assistant", "content": str}``
  (OpenAI style).
- ``sharegpt``: ``conversations``, a list of ``{"from": "system" | "human" | "gpt", "value": str}``.
- ``text``: ``text``, raw text for continued pre-training: every token is trained, EOS is appended.

Other column names are mapped with ``columns={"instruction": "question", "output": "answer"}``
(:func:`rename_columns`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from lorakit.errors import DataError

__all__ = [
    "FORMATS",
    "SHAREGPT_ROLES",
    "TEXT_ROLE",
    "Format",
    "detect_format",
    "rename_columns",
    "to_messages",
]

Format = Literal["alpaca", "prompt_completion", "messages", "sharegpt", "text"]

TEXT_ROLE = "text"
"""The role of the single message a ``text`` row becomes; encoding trains all of it and appends EOS."""

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
"""ShareGPT ``from`` values and the role each becomes."""

FORMATS: dict[str, str] = {
    "alpaca": "instruction, output (optional: input, system)",
    "prompt_completion": "prompt, completion (optional: system)",
    "messages": "messages: a list of {role, content} with roles system / user / assistant",
    "sharegpt": "conversations: a list of {from, value} with from system / human / gpt",
    "text": "text: raw text for continued pre-training (every token trained)",
}
"""Each accepted format and the columns it reads."""

_KEY_COLUMN: dict[str, Format] = {
    "messages": "messages",
    "conversations": "sharegpt",
    "instruction": "alpaca",
    "prompt": "prompt_completion",
    "text": "text",
}


def rename_columns(
    rows: list[dict[str, Any]], columns: Mapping[str, str] | None, *, source_name: str
) -> list[dict[str, Any]]:
    """Rows with their fields renamed: ``columns`` maps lorakit's field name to the name in your data.

    Raises:
        DataError: a mapped column is in no row (the message lists the columns that exist).
    """
    if not columns:
        return rows
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row))
    missing = [theirs for theirs in columns.values() if theirs not in present]
    if missing:
        raise DataError(
            f"{source_name}: columns= maps to {', '.join(repr(m) for m in missing)}, but the data has no such "
            f"column (columns: {list(present)}). Fix the mapping {{lorakit name: your column}}."
        )
    renamed = []
    for row in rows:
        new = {key: value for key, value in row.items() if key not in columns.values()}
        for ours, theirs in columns.items():
            if theirs in row:
                new[ours] = row[theirs]
        renamed.append(new)
    return renamed


def detect_format(column_names: Iterable[str]) -> Format:
    """Which format rows with these columns are in: ``messages``, ``instruction`` or ``prompt`` decide.

    Missing companion fields (e.g. ``output``) are reported per row by :func:`to_messages`.

    Raises:
        DataError: none of the key columns is present; the message lists the columns seen.
    """
    columns = list(column_names)
    for key, fmt in _KEY_COLUMN.items():
        if key in columns:
            return fmt
    accepted = "; ".join(f"{fmt}: {fields}" for fmt, fields in FORMATS.items())
    raise DataError(
        f"Cannot tell the data format from the columns {columns}. Accepted formats: {accepted}. "
        "Rename your columns to one of these, or map them: "
        'with_dataset(..., columns={"instruction": "question", "output": "answer"}).'
    )


def to_messages(
    row: Mapping[str, Any],
    fmt: Format,
    *,
    row_index: int,
    source_name: str,
    line: int | None = None,
    stats: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row as a conversation, with surrounding whitespace stripped from every text field.

    An alpaca ``input`` stays on the user message as ``"input"`` (only when non-empty) so the alpaca template
    can give it its own section. Empty replies are kept; :func:`lorakit.data.prepare_data` drops and counts
    them.

    Text is stripped and Unicode-normalised to NFC; with ``stats`` given, ``stats["stripped"]`` and
    ``stats["nfc_normalized"]`` count the rows these changed. ``line`` (the line in the file) is named in
    errors when known.

    Raises:
        DataError: a missing or non-text field, an unknown role, or a conversation without an assistant reply
            or starting with one; the message names the source, the row (and line), the field and the fix.
    """
    where = (
        f"{source_name}, row {row_index}" if line is None else f"{source_name}, line {line} (row {row_index})"
    )
    changes: set[str] = set()
    messages = _convert(row, fmt, where, changes)
    if stats is not None:
        for change in changes:
            stats[change] = stats.get(change, 0) + 1
    return messages


def _convert(row: Mapping[str, Any], fmt: Format, where: str, changes: set[str]) -> list[dict[str, Any]]:
    def _text(row: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str:
        return _clean_text(row, field, where, changes, required=required)

    def _check_conversation(conversation: list[Any], where: str, field: str) -> list[dict[str, Any]]:
        return _conversation(conversation, where, field, changes)

    if fmt == "text":
        return [{"role": TEXT_ROLE, "content": _text(row, "text", where)}]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise DataError(
                f"{where}: field 'conversations' must be a list of {{from, value}} dicts, got {_show(turns)}."
            )
        converted = []
        for index, turn in enumerate(turns):
            at = f"{where}, conversations[{index}]"
            if not isinstance(turn, Mapping):
                raise DataError(f"{at}: expected a {{from, value}} dict, got {_show(turn)}.")
            speaker = turn.get("from")
            if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
                raise DataError(
                    f"{at}: unknown speaker 'from': {_show(speaker)}; use one of {', '.join(SHAREGPT_ROLES)} "
                    "(or convert the rows to the messages format)."
                )
            if "value" not in turn:
                raise DataError(f"{at}: missing field 'value' (fields present: {_fields(turn)}).")
            converted.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
        return _check_conversation(converted, where, "conversations")
    if fmt == "alpaca":
        system = _text(row, "system", where, required=False)
        user: dict[str, Any] = {"role": "user", "content": _text(row, "instruction", where)}
        extra = _text(row, "input", where, required=False)
        if extra:
            user["input"] = extra
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, user, {"role": "assistant", "content": _text(row, "output", where)}]
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return _check_conversation([*prompt, *completion], where, "prompt + completion")
        system = _text(row, "system", where, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        return [
            *messages,
            {"role": "user", "content": _text(row, "prompt", where)},
            {"role": "assistant", "content": _text(row, "completion", where)},
        ]
    if fmt == "messages":
        conversation = row.get("messages")
        if not isinstance(conversation, list):
            raise DataError(
                f"{where}: field 'messages' must be a list of {{role, content}} dicts, got {_show(conversation)}."
            )
        return _check_conversation(conversation, where, "messages")
    raise DataError(f"Unknown data format {fmt!r}; use one of {', '.join(FORMATS)}.")


def _clean_text(
    row: Mapping[str, Any], field: str, where: str, changes: set[str], *, required: bool = True
) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(
                f"{where}: missing field {field!r} (fields present: {_fields(row)}). If your data names it "
                f'differently, map it: columns={{"{field}": "<your column>"}}.'
            )
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: field {field!r} must be text, got {type(value).__name__} {_show(value)}. Give it a string."
        )
    raw = _text_of(value, field, where)
    text = raw.strip()
    if text != raw:
        changes.add("stripped")
    normal = unicodedata.normalize("NFC", text)
    if normal != text:
        changes.add("nfc_normalized")
    return normal


def _text_of(value: str | int | float, field: str, where: str) -> str:
    """The text of a field; numbers become their digits. Text a tokenizer cannot take is a DataError."""
    try:
        raw = str(value)
    except ValueError as error:  # an integer with more digits than Python converts
        raise DataError(f"{where}: field {field!r} is a number too long to be text ({error}).") from error
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = raw[error.start]
        raise DataError(
            f"{where}: field {field!r} holds a lone surrogate {bad!r} at character {error.start}, which is not "
            "valid Unicode text (often a badly decoded emoji). Fix the encoding of the source, or drop the row."
        ) from error
    return raw


def _show(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (never fails on odd values)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # huge integers, very deep nesting
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(row: Mapping[Any, Any]) -> list[str]:
    """A row's field names, sorted, for error messages (names need not be strings)."""
    return sorted(str(key) for key in row)


def _conversation(conversation: list[Any], where: str, field: str, changes: set[str]) -> list[dict[str, Any]]:
    def _text(row: Mapping[str, Any], field: str, where: str) -> str:
        return _clean_text(row, field, where, changes)

    messages: list[dict[str, Any]] = []
    for index, message in enumerate(conversation):
        at = f"{where}, {field}[{index}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{at}: expected a {{role, content}} dict, got {_show(message)}.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise DataError(f"{at}: unknown role {_show(role)}; use 'system', 'user' or 'assistant'.")
        if role == "system" and index > 0:
            raise DataError(f"{at}: a system message may only come first.")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": "..."}, ...]
            message = {"content": _join_text_parts(content, at)}
        messages.append({"role": role, "content": _text(message, "content", at)})
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] == "assistant":
        raise DataError(
            f"{where}, field {field!r}: the conversation must start with a user turn (after an optional "
            "system message)."
        )
    if not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where}, field {field!r}: the conversation has no assistant turn to train on.")
    return messages


def _join_text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for index, part in enumerate(parts):
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise DataError(
                f"{where}, content[{index}]: only text parts ({{'type': 'text', 'text': ...}}) can be trained "
                f"on, got {_show(part)}. Remove image / audio parts or convert them to text."
            )
        texts.append(part["text"])
    return "".join(texts)

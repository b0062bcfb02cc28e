"""The three accepted row formats, and their conversion to a list of messages.

- ``alpaca``: ``instruction``, ``output``; optional ``input`` and ``system``.
- ``prompt_completion``: ``prompt``, ``completion``; optional ``system``. Both may also be lists of
  messages (TRL's conversational prompt-completion form).
- ``messages``: ``messages``, a list of ``{"role": "system" | "user" | "assistant", "content": str}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from lorakit.errors import DataError

__all__ = ["FORMATS", "Format", "detect_format", "to_messages"]

Format = Literal["alpaca", "prompt_completion", "messages"]

FORMATS: dict[str, str] = {
    "alpaca": "instruction, output (optional: input, system)",
    "prompt_completion": "prompt, completion (optional: system)",
    "messages": "messages: a list of {role, content} with roles system / user / assistant",
}
"""Each accepted format and the columns it reads."""

_KEY_COLUMN: dict[str, Format] = {
    "messages": "messages",
    "instruction": "alpaca",
    "prompt": "prompt_completion",
}


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
        "Rename your columns to one of these."
    )


def to_messages(
    row: Mapping[str, Any], fmt: Format, *, row_index: int, source_name: str
) -> list[dict[str, Any]]:
    """One row as a conversation, with surrounding whitespace stripped from every text field.

    An alpaca ``input`` stays on the user message as ``"input"`` (only when non-empty) so the alpaca template
    can give it its own section. Empty replies are kept; :func:`lorakit.data.prepare_data` drops and counts
    them.

    Raises:
        DataError: a missing or non-text field, an unknown role, or a conversation without an assistant reply
            or starting with one; the message names the source, the row index and the field.
    """
    where = f"{source_name}, row {row_index}"
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
                f"{where}: field 'messages' must be a list of {{role, content}} dicts, got {conversation!r}."
            )
        return _check_conversation(conversation, where, "messages")
    raise DataError(f"Unknown data format {fmt!r}; use one of {', '.join(FORMATS)}.")


def _text(row: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(row)}).")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__} {value!r}.")
    return str(value).strip()


def _check_conversation(conversation: list[Any], where: str, field: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(conversation):
        at = f"{where}, {field}[{index}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{at}: expected a {{role, content}} dict, got {message!r}.")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{at}: unknown role {role!r}; use 'system', 'user' or 'assistant'.")
        if role == "system" and index > 0:
            raise DataError(f"{at}: a system message may only come first.")
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

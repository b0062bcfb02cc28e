"""The prompt-template protocol and the helpers every template shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lorakit.errors import DataError

__all__ = [
    "ROLES",
    "Message",
    "PromptTemplate",
    "Segment",
    "adds_bos",
    "check_messages",
    "merge_segments",
    "user_text",
]

Segment = tuple[str, bool]
"""A piece of rendered text and whether it is trained (carries loss)."""

Message = Mapping[str, Any]
"""``{"role": "system" | "user" | "assistant", "content": str}``; a user message may carry ``"input"``."""

ROLES = ("system", "user", "assistant")


@runtime_checkable
class PromptTemplate(Protocol):
    """What lorakit needs from a prompt template.

    A template turns a conversation into text pieces and says which pieces are trained. Any object with
    these members works (``get_template`` accepts it); it does not have to subclass anything.

    Saving a run stores ``to_dict()``; :func:`lorakit.templates.template_from_dict` rebuilds the template
    from it. A template of your own should return ``{"class": "my_module:MyTemplate", ...}`` and be decorated
    with :func:`lorakit.templates.register_template_class` (only registered classes may be named in a file);
    it is rebuilt with ``MyTemplate.from_dict(d)`` if it defines one, else ``MyTemplate(**rest)`` with the
    other keys.
    """

    @property
    def name(self) -> str:
        """Shown in plans and saved with the run."""
        ...

    def render(
        self, messages: Sequence[Message], *, tokenizer: Any, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """The conversation as ``(text, trained)`` pieces, in order.

        ``trained`` is True exactly for assistant output, including the text that ends the turn (EOS or an
        end-of-turn marker), so the model learns to stop. With ``add_generation_prompt=True`` the messages
        end with a user turn and the last piece is the assistant header the model continues from.
        """
        ...

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """Strings that end an assistant turn at generation time."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description that ``template_from_dict`` turns back into an equal template."""
        ...


def merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Join neighbouring pieces with the same ``trained`` flag and drop empty ones.

    Rendering with and without the generation prompt then splits the prompt in the same places, so the
    tokens of an inference prompt equal the prompt tokens seen in training.
    """
    merged: list[Segment] = []
    for text, trained in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def check_messages(messages: Sequence[Message], *, add_generation_prompt: bool) -> None:
    """Raise DataError unless every message has a known role and string content.

    With ``add_generation_prompt=True`` the conversation must end with a user turn.
    """
    if not messages:
        raise DataError("A conversation needs at least one message; got an empty list.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"Message {index} must be a dict with 'role' and 'content', got {message!r}.")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"Message {index} has role {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(message.get("content"), str):
            raise DataError(
                f"Message {index} ({role}) needs a string 'content', got {message.get('content')!r}."
            )
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise DataError(
            "add_generation_prompt=True needs a conversation that ends with a user turn, but the last "
            f"message is a {messages[-1]['role']} message."
        )


def user_text(message: Message) -> str:
    """The user's content with an alpaca ``input`` field, if any, appended after a blank line."""
    extra = message.get("input") or ""
    return f"{message['content']}\n\n{extra}" if extra else message["content"]


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts BOS first by default (so lorakit's encoder and exported templates do too)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]

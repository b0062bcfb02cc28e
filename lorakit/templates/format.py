"""Templates built from format strings: the user-defined kind, and chatml / llama2."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from lorakit.errors import ConfigError
from lorakit.templates.base import Message, Segment, check_messages, merge_segments, user_text

__all__ = ["Template", "fill"]

_PLACEHOLDER = re.compile(r"\{(content|input|bos|eos)\}")
_ANY_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(pattern: str, *, tokenizer: Any, content: str = "", input: str = "") -> str:
    """Replace ``{content}``, ``{input}``, ``{bos}`` and ``{eos}`` in one pass.

    Other braces are kept literally (no ``{{`` escaping needed), and placeholders inside the inserted
    content are left alone.
    """
    values = {
        "content": content,
        "input": input,
        "bos": getattr(tokenizer, "bos_token", None) or "",
        "eos": getattr(tokenizer, "eos_token", None) or "",
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], pattern)


def _placeholders(allowed: tuple[str, ...], *, required: str | None = None) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise ConfigError(f"Template `{attribute.name}` must be a string, got {value!r}.")
        unknown = sorted(set(_ANY_PLACEHOLDER.findall(value)) - set(allowed))
        if unknown:
            raise ConfigError(
                f"Template `{attribute.name}` uses unknown placeholder(s) "
                f"{', '.join('{' + u + '}' for u in unknown)} in {value!r}; it may use "
                f"{', '.join('{' + a + '}' for a in allowed)}."
            )
        if required is not None and "{" + required + "}" not in value:
            raise ConfigError(f"Template `{attribute.name}` must contain {{{required}}}, got {value!r}.")

    return check


def _non_empty_name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"Template `name` must be a non-empty string, got {value!r}.")


def _stop_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


_SPECIAL = ("bos", "eos")


@attrs.frozen
class Template:
    """A prompt template made of format strings, for any turn-based chat format.

    Placeholders: ``{content}`` (the message text), ``{input}`` (alpaca's input field, in ``user_with_input``
    only), ``{bos}`` / ``{eos}`` (the tokenizer's BOS / EOS token text). Other braces are literal.

    A conversation renders as ``begin``, then per message ``system`` / ``user`` / ``generation_prompt`` +
    ``assistant`` + ``after_assistant``. Only ``assistant`` (the reply and its end-of-turn text) is trained.

    Example:
        >>> zephyr = Template(
        ...     "zephyr",
        ...     system="<|system|>\\n{content}{eos}\\n",
        ...     user="<|user|>\\n{content}{eos}\\n",
        ...     generation_prompt="<|assistant|>\\n",
        ...     assistant="{content}{eos}",
        ...     after_assistant="\\n",
        ... )
    """

    name: str = attrs.field(validator=_non_empty_name)
    """Shown in plans and saved with the run."""
    user: str = attrs.field(
        default="{content}\n", validator=_placeholders(("content", *_SPECIAL), required="content")
    )
    """A user turn (untrained)."""
    assistant: str = attrs.field(
        default="{content}{eos}", validator=_placeholders(("content", *_SPECIAL), required="content")
    )
    """An assistant reply including its end-of-turn text: the trained part."""
    generation_prompt: str = attrs.field(default="", validator=_placeholders(_SPECIAL))
    """The assistant header before each reply (untrained); also what generation continues from."""
    after_assistant: str = attrs.field(default="", validator=_placeholders(_SPECIAL))
    """Untrained text after each reply, e.g. the newline after chatml's ``<|im_end|>``."""
    system: str = attrs.field(
        default="{content}\n\n", validator=_placeholders(("content", *_SPECIAL), required="content")
    )
    """A system message (untrained)."""
    system_in_first_user: bool = attrs.field(default=False, converter=bool)
    """Put the rendered system message inside the first user turn's ``{content}`` (Llama 2 style)."""
    user_with_input: str | None = attrs.field(
        default=None, validator=_placeholders(("content", "input", *_SPECIAL), required="content")
    )
    """A user turn with a non-empty alpaca ``input``; if None, the input is appended to the content."""
    begin: str = attrs.field(default="", validator=_placeholders(_SPECIAL))
    """Text once at the very start, e.g. ``"{bos}"`` if the format wants BOS and the tokenizer adds none."""
    stop: tuple[str, ...] = attrs.field(default=("{eos}",), converter=_stop_tuple)
    """Strings that end a reply at generation time (``{eos}`` / ``{bos}`` allowed)."""

    @stop.validator
    def _check_stop(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        for item in value:
            _placeholders(_SPECIAL)(self, attribute, item)

    def render(
        self, messages: Sequence[Message], *, tokenizer: Any, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """See :meth:`lorakit.templates.PromptTemplate.render`."""
        check_messages(messages, add_generation_prompt=add_generation_prompt)
        segments: list[Segment] = [(fill(self.begin, tokenizer=tokenizer), False)]
        pending_system = ""
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                text = fill(self.system, tokenizer=tokenizer, content=content)
                if self.system_in_first_user:
                    pending_system += text
                else:
                    segments.append((text, False))
            elif role == "user":
                extra = message.get("input") or ""
                if extra and self.user_with_input is not None:
                    text = fill(
                        self.user_with_input,
                        tokenizer=tokenizer,
                        content=pending_system + content,
                        input=extra,
                    )
                else:
                    text = fill(self.user, tokenizer=tokenizer, content=pending_system + user_text(message))
                pending_system = ""
                segments.append((text, False))
            else:
                segments.append((fill(self.generation_prompt, tokenizer=tokenizer), False))
                segments.append((fill(self.assistant, tokenizer=tokenizer, content=content), True))
                segments.append((fill(self.after_assistant, tokenizer=tokenizer), False))
        if pending_system:  # a system message that no user turn followed
            segments.append((pending_system, False))
        if add_generation_prompt:
            segments.append((fill(self.generation_prompt, tokenizer=tokenizer), False))
        return merge_segments(segments)

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """The ``stop`` strings with ``{eos}`` / ``{bos}`` filled in (empty ones and duplicates dropped)."""
        stops = (fill(s, tokenizer=tokenizer) for s in self.stop)
        return list(dict.fromkeys(s for s in stops if s))

    def to_dict(self) -> dict[str, Any]:
        """All fields, tagged ``"kind": "format"``; :meth:`from_dict` rebuilds an equal template."""
        data = attrs.asdict(self)
        data["stop"] = list(self.stop)
        return {"kind": "format", **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Template:
        """Rebuild a template from :meth:`to_dict` output."""
        fields = {key: value for key, value in data.items() if key != "kind"}
        unknown = sorted(set(fields) - {a.name for a in attrs.fields(cls)})
        if unknown:
            raise ConfigError(f"Unknown Template field(s) {', '.join(unknown)} in {dict(data)!r}.")
        return cls(**fields)

"""``template="model"``: the tokenizer's own chat template, with the assistant spans found by rendering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.errors import ConfigError
from lorakit.templates.base import Message, Segment, check_messages, merge_segments, user_text

__all__ = ["ModelTemplate"]

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "lorakit-probe"}]


@attrs.frozen
class ModelTemplate:
    """The tokenizer's ``chat_template`` (or a Jinja string of your own), rendered with ``apply_chat_template(..., tokenize=False)``.

    Chat templates only produce text, so the trained spans are found by rendering incrementally: for the
    assistant message ``i``, ``messages[:i]`` with the generation prompt is the prefix and ``messages[:i+1]``
    the full text; the difference is the reply and its end-of-turn text (trained), minus trailing whitespace
    (untrained). Each rendering must extend the previous one; templates that rewrite earlier turns (e.g.
    dropping the reasoning of past replies) cannot be masked this way and raise ConfigError.

    If the template puts nothing after a reply, the tokenizer's EOS is appended (trained) so the model
    learns to stop. The tokenizer is saved with the run, so ``to_dict`` stores the name only.
    """

    name: str = "model"
    """Shown in plans and saved with the run."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the tokenizer's own (``get_template("{% for ... %}")``)."""

    def render(
        self, messages: Sequence[Message], *, tokenizer: Any, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """See :meth:`lorakit.templates.PromptTemplate.render`."""
        check_messages(messages, add_generation_prompt=add_generation_prompt)
        plain = [
            {"role": m["role"], "content": user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages
        ]
        segments: list[Segment] = []
        done = ""
        for index, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            prefix = _apply(tokenizer, plain[:index], True, self.chat_template)
            full = _apply(tokenizer, plain[: index + 1], False, self.chat_template)
            _check_extends(done, prefix, index)
            _check_extends(prefix, full, index + 1)
            reply = full[len(prefix) :]
            trained = reply.rstrip()
            segments.append((prefix[len(done) :], False))
            if message["content"] and trained.endswith(message["content"]) and tokenizer.eos_token:
                # Nothing marks the end of the reply: train EOS so generation stops.
                segments.append((trained + tokenizer.eos_token, True))
            else:
                segments.append((trained, True))
            segments.append((reply[len(trained) :], False))
            done = full
        final = _apply(tokenizer, plain, add_generation_prompt, self.chat_template)
        _check_extends(done, final, len(plain))
        segments.append((final[len(done) :], False))
        return merge_segments(segments)

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """The end-of-turn text the template puts after a reply (e.g. ``<|im_end|>``), and EOS."""
        stops: list[str] = []
        try:
            prefix = _apply(tokenizer, _PROBE[:1], True, self.chat_template)
            full = _apply(tokenizer, _PROBE, False, self.chat_template)
        except ConfigError:
            full = prefix = ""
        reply = full[len(prefix) :] if full.startswith(prefix) else ""
        content = _PROBE[1]["content"]
        if content in reply:
            stops.append(reply[reply.index(content) + len(content) :].strip())
        stops.append(tokenizer.eos_token or "")
        return list(dict.fromkeys(s for s in stops if s))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": "model"}`` (the chat template travels with the saved tokenizer), or with a Jinja string
        of its own, the class and both fields."""
        if self.chat_template is None:
            return {"name": self.name}
        return {
            "class": "lorakit.templates.model:ModelTemplate",
            "name": self.name,
            "chat_template": self.chat_template,
        }


def _apply(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, chat_template: str | None
) -> str:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "template='model' needs a tokenizer with a chat_template, and this tokenizer has none "
            f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}). "
            "Pass template='chatml', 'alpaca' or 'llama2', or a Template(...) of your own."
        )
    if not messages:
        return ""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"chat_template": chat_template} if chat_template is not None else {}),
        )
    except Exception as error:  # a chat template is user code: jinja2.TemplateError (e.g. "roles must alternate"), or any error its filters raise; re-raised with context
        raise ConfigError(
            f"The tokenizer's chat_template failed to render {len(messages)} message(s): {error}. "
            "Fix the conversation, or pass template='chatml' or a Template(...) of your own."
        ) from error
    if not isinstance(text, str):
        raise ConfigError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected a string."
        )
    return text


def _check_extends(shorter: str, longer: str, n_messages: int) -> None:
    if not longer.startswith(shorter):
        raise ConfigError(
            "template='model': the tokenizer's chat_template does not render conversations incrementally "
            f"(the rendering up to message {n_messages} does not start with the rendering of the turns "
            "before it), so the assistant replies cannot be located for label masking. Pass "
            "template='chatml' (or the matching built-in), or a Template(...) that reproduces the format."
        )

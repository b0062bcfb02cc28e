"""A lorakit template as a Jinja chat template, so plain transformers renders the prompts lorakit trained on.

``InferenceModel.save()`` writes the result into the saved tokenizer; afterwards
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` gives the same text (and token ids)
as lorakit's own prompt rendering, BOS included when the tokenizer adds one by default.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lorakit.errors import ConfigError
from lorakit.templates.base import PromptTemplate, adds_bos
from lorakit.templates.builtin import PREAMBLE, PREAMBLE_WITH_INPUT, AlpacaTemplate
from lorakit.templates.format import Template
from lorakit.templates.model import ModelTemplate

__all__ = ["to_chat_template"]

_PLACEHOLDER = re.compile(r"\{(content|input|bos|eos)\}")


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja unescapes Python-style backslash escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _expr(pattern: str, *, content: str = '""', input: str = '""') -> str:
    """A Jinja expression that evaluates to :func:`lorakit.templates.format.fill` of ``pattern``."""
    values = {"content": content, "input": input, "bos": "(bos_token or '')", "eos": "(eos_token or '')"}
    parts: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(pattern):
        if match.start() > position:
            parts.append(_lit(pattern[position : match.start()]))
        parts.append(values[match.group(1)])
        position = match.end()
    if position < len(pattern):
        parts.append(_lit(pattern[position:]))
    return "(" + " ~ ".join(parts) + ")" if parts else '""'


_HAS_INPUT = "(message.input is defined and message.input)"


def _format_template(t: Template) -> str:
    user_plain = _expr(
        t.user,
        content="(ns.pending ~ message.content ~ (('\\n\\n' ~ message.input) if " + _HAS_INPUT + " else ''))",
    )
    user = "{{ " + user_plain + " }}"
    if t.user_with_input is not None:
        with_input = _expr(t.user_with_input, content="(ns.pending ~ message.content)", input="message.input")
        user = "{% if " + _HAS_INPUT + " %}{{ " + with_input + " }}{% else %}" + user + "{% endif %}"
    system = _expr(t.system, content="message.content")
    system_part = (
        "{% set ns.pending = ns.pending ~ " + system + " %}"
        if t.system_in_first_user
        else "{{ " + system + " }}"
    )
    generation = _expr(t.generation_prompt)
    return (
        "{% set ns = namespace(pending='') %}"
        "{{ " + _expr(t.begin) + " }}"
        "{% for message in messages %}"
        "{% if message.role == 'system' %}" + system_part + ""
        "{% elif message.role == 'user' %}" + user + "{% set ns.pending = '' %}"
        "{% else %}{{ "
        + generation
        + " ~ "
        + _expr(t.assistant, content="message.content")
        + " ~ "
        + _expr(t.after_assistant)
        + " }}{% endif %}"
        "{% endfor %}"
        "{{ ns.pending }}"
        "{% if add_generation_prompt %}{{ " + generation + " }}{% endif %}"
    )


def _alpaca_template() -> str:
    return (
        "{% set ns = namespace(found=false, has_input=false) %}"
        "{% for message in messages %}{% if message.role == 'system' %}{{ message.content ~ '\\n\\n' }}{% endif %}"
        "{% if message.role == 'user' and not ns.found %}{% set ns.found = true %}"
        "{% if " + _HAS_INPUT + " %}{% set ns.has_input = true %}{% endif %}{% endif %}{% endfor %}"
        "{% if ns.has_input %}{{ " + _lit(PREAMBLE_WITH_INPUT + "\n\n") + " }}"
        "{% else %}{{ " + _lit(PREAMBLE + "\n\n") + " }}{% endif %}"
        "{% set turns = messages | rejectattr('role', 'equalto', 'system') | list %}"
        "{% for message in turns %}{% if message.role == 'user' %}"
        "{{ '### Instruction:\\n' ~ message.content ~ '\\n\\n' }}"
        "{% if " + _HAS_INPUT + " %}{{ '### Input:\\n' ~ message.input ~ '\\n\\n' }}{% endif %}"
        "{% else %}{{ '### Response:\\n' ~ message.content ~ (eos_token or '') }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    )


def _with_bos(body: str) -> str:
    """Wrap a chat template so the text starts with BOS (when it does not already)."""
    return (
        "{% set lorakit_body %}" + body + "{% endset %}"
        "{% if bos_token and not lorakit_body.startswith(bos_token) %}{{ bos_token }}{% endif %}"
        "{{ lorakit_body }}"
    )


def to_chat_template(template: PromptTemplate, tokenizer: Any) -> str:
    """The Jinja chat template that renders like ``template`` (with ``tokenizer``'s BOS / EOS).

    Built-in, format-string (:class:`Template`) and ``"model"`` / Jinja templates are supported. When the
    tokenizer adds BOS by default (lorakit's encoder then puts BOS first), the template writes it, because
    ``apply_chat_template`` tokenizes without adding special tokens.

    Raises:
        ConfigError: a template of another kind (a user class), which cannot be translated.
    """
    if callable(getattr(template, "resolve", None)):  # template="auto": what it is for this tokenizer
        template = template.resolve(tokenizer)
    if isinstance(template, AlpacaTemplate):
        body = _alpaca_template()
    elif isinstance(template, Template):
        body = _format_template(template)
    elif isinstance(template, ModelTemplate):
        body = template.chat_template or getattr(tokenizer, "chat_template", None) or ""
        if not body:
            raise ConfigError(
                "template='model' needs a tokenizer with a chat_template to export, and this tokenizer has none."
            )
    else:
        raise ConfigError(
            f"Cannot write template {getattr(template, 'name', template)!r} ({type(template).__name__}) as a "
            "Jinja chat template: only built-in, Template(...) and 'model' templates can be exported. Pass "
            "chat_template=False to save() to keep the tokenizer's own, or chat_template='<jinja>' to set one."
        )
    return _with_bos(body) if adds_bos(tokenizer) else body

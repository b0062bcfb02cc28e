"""Prompt templates: how a conversation becomes text, and which parts of it are trained.

A template is any object with ``name``, ``render()``, ``stop_strings()`` and ``to_dict()`` (see
:class:`PromptTemplate`). Built-ins live in :data:`TEMPLATES`:

- ``"alpaca"``: the Stanford Alpaca instruction prompt.
- ``"chatml"``: ``<|im_start|>role ... <|im_end|>`` (Qwen, SmolLM2, Hermes).
- ``"llama2"``: ``<s>[INST] <<SYS>> ... [/INST] reply </s>``.
- ``"llama3"``, ``"mistral"``, ``"zephyr"``, ``"gemma"``, ``"phi3"``, ``"vicuna"``: those model families' formats.
- ``"model"``: the tokenizer's own ``chat_template``.

A Jinja chat template string (anything containing ``{%`` or ``{{``) is used like ``"model"`` with that string
in place of the tokenizer's template.

Formats of your own: ``Template(name, user=..., assistant=..., ...)`` from format strings, optionally
registered under a name with :func:`register_template`.

Example:
    >>> from lorakit.templates import get_template
    >>> get_template("chatml").stop_strings(tokenizer=None)
    ['<|im_end|>']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from lorakit.errors import ConfigError
from lorakit.templates.base import Message, PromptTemplate, Segment
from lorakit.templates.builtin import (
    ALPACA,
    CHATML,
    GEMMA,
    LLAMA2,
    LLAMA3,
    MISTRAL,
    PHI3,
    VICUNA,
    ZEPHYR,
    AlpacaTemplate,
)
from lorakit.templates.format import Template
from lorakit.templates.model import ModelTemplate

__all__ = [
    "TEMPLATES",
    "AlpacaTemplate",
    "Message",
    "ModelTemplate",
    "PromptTemplate",
    "Segment",
    "Template",
    "get_template",
    "register_template",
    "template_from_dict",
]

TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": ALPACA,
    "chatml": CHATML,
    "llama2": LLAMA2,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "zephyr": ZEPHYR,
    "gemma": GEMMA,
    "phi3": PHI3,
    "vicuna": VICUNA,
    "model": ModelTemplate(),
}
"""Every template known by name. Add to it with :func:`register_template`."""


def register_template(name: str, template: PromptTemplate) -> None:
    """Make ``template`` available as ``get_template(name)`` / ``with_dataset(..., template=name)``.

    Raises:
        ConfigError: ``name`` is taken, or ``template`` does not implement :class:`PromptTemplate`.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"A template name must be a non-empty string, got {name!r}.")
    if name in TEMPLATES:
        raise ConfigError(
            f"A template named {name!r} is already registered; pick another name "
            f"(registered: {', '.join(sorted(TEMPLATES))})."
        )
    if not isinstance(template, PromptTemplate):
        raise ConfigError(
            f"register_template({name!r}, ...) needs an object with name, render(), stop_strings() and "
            f"to_dict(); got {type(template).__name__}."
        )
    TEMPLATES[name] = template


def get_template(name_or_template: str | Mapping[str, Any] | PromptTemplate) -> PromptTemplate:
    """The template registered under a name, a Jinja chat template string, one rebuilt from ``to_dict()`` output, or the object itself.

    Raises:
        ConfigError: an unknown name (the message lists the known ones) or an object that is not a template.
    """
    if isinstance(name_or_template, str):
        if "{%" in name_or_template or "{{" in name_or_template:
            return ModelTemplate(name="jinja", chat_template=name_or_template)
        template = TEMPLATES.get(name_or_template)
        if template is None:
            raise ConfigError(
                f"Unknown template {name_or_template!r}. Known templates: {', '.join(sorted(TEMPLATES))}. "
                "Or pass a Template(...) of your own, or register one with register_template()."
            )
        return template
    if isinstance(name_or_template, Mapping):
        return template_from_dict(name_or_template)
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    raise ConfigError(
        f"`template` must be a name ({', '.join(sorted(TEMPLATES))}) or an object with name, render(), "
        f"stop_strings() and to_dict(); got {type(name_or_template).__name__}."
    )


def template_from_dict(data: Mapping[str, Any]) -> PromptTemplate:
    """Rebuild a template from its ``to_dict()`` output.

    - ``{"class": "module:QualName", ...}``: the class is imported and built with ``cls.from_dict(data)`` if
      it has one, else ``cls(**rest)`` with the other keys.
    - ``{"kind": "format", ...}``: a :class:`Template`.
    - ``{"name": ...}``: the template registered under that name.

    Raises:
        ConfigError: the dict matches none of these, or the class cannot be imported.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"template_from_dict() needs a dict, got {type(data).__name__}.")
    if "class" in data:
        cls = _import_class(data["class"])
        if hasattr(cls, "from_dict"):
            template = cls.from_dict(dict(data))
        else:
            template = cls(**{key: value for key, value in data.items() if key != "class"})
        return get_template(template)
    if data.get("kind") == "format":
        return Template.from_dict(data)
    name = data.get("name")
    if isinstance(name, str) and name in TEMPLATES:
        return TEMPLATES[name]
    raise ConfigError(
        f"Cannot rebuild a template from {dict(data)!r}: expected a registered name "
        f"({', '.join(sorted(TEMPLATES))}), 'kind': 'format', or 'class': 'module:QualName'. If it is a "
        "template you registered, call register_template() before loading."
    )


def _import_class(path: Any) -> Any:
    if not isinstance(path, str) or ":" not in path:
        raise ConfigError(f"A template 'class' must look like 'package.module:ClassName', got {path!r}.")
    module_name, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"Cannot import template class {path!r} ({error}); make sure its module is importable."
        ) from error
    return target

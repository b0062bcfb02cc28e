"""Prompt templates: how a conversation becomes text, and which parts of it are trained.

A template is any object with ``name``, ``render()``, ``stop_strings()`` and ``to_dict()`` (see
:class:`PromptTemplate`). Built-ins live in :data:`TEMPLATES`:

- ``"alpaca"``: the Stanford Alpaca instruction prompt.
- ``"chatml"``: ``<|im_start|>role ... <|im_end|>`` (Qwen, SmolLM2, Hermes).
- ``"llama2"``: ``<s>[INST] <<SYS>> ... [/INST] reply </s>``.
- ``"llama3"``, ``"mistral"``, ``"zephyr"``, ``"gemma"``, ``"phi3"``, ``"vicuna"``: those model families' formats.
- ``"model"``: the tokenizer's own ``chat_template``.
- ``"auto"`` (the default of ``with_dataset``): ``"model"`` when the tokenizer has a chat template, else
  ``"alpaca"``; decided per tokenizer, so a run and its saved tokenizer always agree.

A Jinja chat template string (anything containing ``{%`` or ``{{``) is used like ``"model"`` with that string
in place of the tokenizer's template.

Formats of your own: ``Template(name, user=..., assistant=..., ...)`` from format strings, optionally
registered under a name with :func:`register_template`.

Template classes of your own (saved as ``{"class": "module:Name", ...}``): a run record, YAML config or
``data.template`` may only name a class registered in :data:`TEMPLATE_CLASSES` (the built-ins, and classes
decorated with :func:`register_template_class`). Any other class path raises a ConfigError before its module
is imported, so a file cannot make lorakit import and call arbitrary code (``{"class": "subprocess:run"}``),
unless the caller opts in with ``trust_template_classes=True``.

Example:
    >>> from lorakit.templates import get_template
    >>> get_template("chatml").stop_strings(tokenizer=None)
    ['<|im_end|>']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

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
    "AUTO",
    "AutoTemplate",
    "TEMPLATES",
    "TEMPLATE_CLASSES",
    "AlpacaTemplate",
    "Message",
    "ModelTemplate",
    "PromptTemplate",
    "Segment",
    "Template",
    "describe_template",
    "get_template",
    "register_template",
    "register_template_class",
    "template_from_dict",
]


@attrs.frozen
class AutoTemplate:
    """``template="auto"``: the tokenizer's own chat template when it has one, else alpaca.

    The choice is made from the tokenizer each call gets (:meth:`resolve`); training saves the tokenizer with
    the run, so loading the run makes the same choice.
    """

    name: str = "auto"
    """Shown in plans and saved with the run."""

    def resolve(self, tokenizer: Any) -> PromptTemplate:
        """``TEMPLATES["model"]`` when ``tokenizer.chat_template`` is set, else ``TEMPLATES["alpaca"]``."""
        return TEMPLATES["model"] if getattr(tokenizer, "chat_template", None) else TEMPLATES["alpaca"]

    def render(
        self, messages: Sequence[Message], *, tokenizer: Any, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """See :meth:`lorakit.templates.PromptTemplate.render`."""
        return self.resolve(tokenizer).render(
            messages, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt
        )

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """The stop strings of the resolved template."""
        return self.resolve(tokenizer).stop_strings(tokenizer)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": "auto"}``."""
        return {"name": self.name}


AUTO = AutoTemplate()
"""``template="auto"``, the default of ``with_dataset``: not in :data:`TEMPLATES` (it is not a format of its
own, it picks one of them per tokenizer)."""


def describe_template(template: PromptTemplate, tokenizer: Any) -> str:
    """``"auto -> model (the tokenizer's chat template)"`` / ``"auto -> alpaca (no chat template)"``; other
    templates by name."""
    if not isinstance(template, AutoTemplate):
        return template.name
    if template.resolve(tokenizer) is TEMPLATES["model"]:
        return "auto -> model (the tokenizer's own chat template)"
    return "auto -> alpaca (the tokenizer has no chat template)"


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

TEMPLATE_CLASSES: dict[str, type] = {}
"""The template classes a ``{"class": "module:QualName", ...}`` dict may name, by that class path.

Add to it with :func:`register_template_class`. A dict naming any other class is refused (before anything
is imported) unless the caller passes ``trust_template_classes=True``.
"""

_TEMPLATE_MEMBERS = ("render", "stop_strings", "to_dict")


def _class_path(cls: type) -> str:
    """``"module:QualName"``: how a template's ``to_dict()`` names its class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register_template_class(cls: type) -> type:
    """Allow ``cls`` to be named as ``{"class": "module:QualName", ...}`` in a run record or config file.

    Use it as a class decorator on a template of your own (or call it before loading a run that saved one)::

        @register_template_class
        @attrs.frozen
        class ShoutTemplate: ...

    Registering a class again under the same path (e.g. a notebook cell run twice) replaces the entry.

    Returns:
        ``cls`` unchanged.

    Raises:
        ConfigError: ``cls`` is not a class with ``render()``, ``stop_strings()`` and ``to_dict()``.
    """
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in _TEMPLATE_MEMBERS):
        raise ConfigError(
            f"register_template_class() needs a template class (with render(), stop_strings() and to_dict()), "
            f"got {cls!r}."
        )
    TEMPLATE_CLASSES[_class_path(cls)] = cls
    return cls


for _builtin_class in (AlpacaTemplate, ModelTemplate, Template):
    register_template_class(_builtin_class)
del _builtin_class


def register_template(name: str, template: PromptTemplate) -> None:
    """Make ``template`` available as ``get_template(name)`` / ``with_dataset(..., template=name)``.

    Raises:
        ConfigError: ``name`` is taken, or ``template`` does not implement :class:`PromptTemplate`.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"A template name must be a non-empty string, got {name!r}.")
    if name in TEMPLATES or name == AUTO.name:
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


def get_template(
    name_or_template: str | Mapping[str, Any] | PromptTemplate, *, trust_template_classes: bool = False
) -> PromptTemplate:
    """The template registered under a name, a Jinja chat template string, one rebuilt from ``to_dict()`` output, or the object itself.

    ``trust_template_classes`` is passed to :func:`template_from_dict` for a dict.

    Raises:
        ConfigError: an unknown name (the message lists the known ones) or an object that is not a template.
    """
    if isinstance(name_or_template, str):
        if "{%" in name_or_template or "{{" in name_or_template:
            return ModelTemplate(name="jinja", chat_template=name_or_template)
        template = AUTO if name_or_template == AUTO.name else TEMPLATES.get(name_or_template)
        if template is None:
            raise ConfigError(
                f"Unknown template {name_or_template!r}. Known templates: {', '.join(sorted(TEMPLATES))}. "
                "Or 'auto' (the tokenizer's chat template when it has one, else alpaca), pass a Template(...) "
                "of your own, or register one with register_template()."
            )
        return template
    if isinstance(name_or_template, Mapping):
        return template_from_dict(name_or_template, trust_template_classes=trust_template_classes)
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    raise ConfigError(
        f"`template` must be a name ({', '.join(sorted(TEMPLATES))}) or an object with name, render(), "
        f"stop_strings() and to_dict(); got {type(name_or_template).__name__}."
    )


def template_from_dict(data: Mapping[str, Any], *, trust_template_classes: bool = False) -> PromptTemplate:
    """Rebuild a template from its ``to_dict()`` output.

    - ``{"class": "module:QualName", ...}``: a class registered in :data:`TEMPLATE_CLASSES`, built with
      ``cls.from_dict(data)`` if it has one, else ``cls(**rest)`` with the other keys.
    - ``{"kind": "format", ...}``: a :class:`Template`.
    - ``{"name": ...}``: the template registered under that name.

    Args:
        data: the dict, e.g. read from a run record or a YAML config.
        trust_template_classes: also import and build a ``"class"`` that is not registered. Only for files
            you trust: importing a module and calling the class runs its code.

    Raises:
        ConfigError: the dict matches none of these, it names an unregistered class (without
            ``trust_template_classes=True``; nothing is imported then), or the class cannot be imported.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"template_from_dict() needs a dict, got {type(data).__name__}.")
    if "class" in data:
        cls = _template_class(data["class"], trust=trust_template_classes)
        if hasattr(cls, "from_dict"):
            template = cls.from_dict(dict(data))
        else:
            template = cls(**{key: value for key, value in data.items() if key != "class"})
        return get_template(template)
    if data.get("kind") == "format":
        return Template.from_dict(data)
    name = data.get("name")
    if name == AUTO.name:
        return AUTO
    if isinstance(name, str) and name in TEMPLATES:
        return TEMPLATES[name]
    raise ConfigError(
        f"Cannot rebuild a template from {dict(data)!r}: expected a registered name "
        f"({', '.join(sorted(TEMPLATES))}), 'kind': 'format', or 'class': 'module:QualName'. If it is a "
        "template you registered, call register_template() before loading."
    )


def _template_class(path: Any, *, trust: bool) -> type:
    """The registered class at ``path``; an unregistered one is imported only when ``trust`` is set."""
    if not isinstance(path, str) or ":" not in path:
        raise ConfigError(f"A template 'class' must look like 'package.module:ClassName', got {path!r}.")
    registered = TEMPLATE_CLASSES.get(path)
    if registered is not None:
        return registered
    if not trust:
        raise ConfigError(
            f"Template class {path!r} is not a registered template class, so it was not imported (a run "
            "record or config file could otherwise make lorakit run any code). If you wrote it, register it "
            "before loading: decorate the class with @lorakit.templates.register_template_class (or call "
            "register_template_class(cls)); or, for a file you trust, pass trust_template_classes=True."
        )
    target = _import_class(path)
    if not isinstance(target, type) or not all(callable(getattr(target, m, None)) for m in _TEMPLATE_MEMBERS):
        raise ConfigError(
            f"Template class {path!r} is not a template class (a class with render(), stop_strings() and "
            f"to_dict()); got {target!r}. It was imported but not called."
        )
    return target


def _import_class(path: str) -> Any:
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

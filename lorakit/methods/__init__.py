"""Adapter methods: one module per method, one registry dict.

A method is a frozen attrs spec with a ``name``, ``to_peft_config()`` that builds the PEFT config (``None`` for
full fine-tuning, which trains the model itself), ``mergeable`` (whether its weights fold into the base; a full
fine-tuning run has nothing to fold), and ``to_dict()``. ``METHODS`` maps the name to the spec class so a run
config can rebuild it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lorakit.errors import ConfigError
from lorakit.methods.adalora import AdaLoraSpec
from lorakit.methods.full import FullSpec
from lorakit.methods.ia3 import Ia3Spec
from lorakit.methods.lora import LoraSpec
from lorakit.methods.prefix_tuning import PrefixTuningSpec, PtuningV2Spec
from lorakit.methods.prompt_tuning import PromptTuningSpec
from lorakit.methods.ptuning import PtuningSpec

__all__ = [
    "METHODS",
    "AdaLoraSpec",
    "FullSpec",
    "Ia3Spec",
    "LoraSpec",
    "MethodSpec",
    "PrefixTuningSpec",
    "PromptTuningSpec",
    "PtuningSpec",
    "PtuningV2Spec",
    "method_from_dict",
    "peft_config_for",
    "supports_grad_checkpointing",
    "register_method",
]


@runtime_checkable
class MethodSpec(Protocol):
    """What the pipeline needs from an adapter method spec."""

    name: str
    mergeable: bool

    def to_peft_config(self) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


METHODS: dict[str, type] = {}


def register_method(name: str, spec_cls: type) -> None:
    """Register an adapter method spec class under ``name``; names are unique."""
    if name in METHODS:
        raise ConfigError(
            f"An adapter method named {name!r} is already registered ({METHODS[name].__name__})."
        )
    METHODS[name] = spec_cls


def method_from_dict(data: dict[str, Any]) -> MethodSpec:
    """Rebuild a method spec from ``to_dict()`` output (e.g. a saved run config)."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"Unknown adapter method {name!r}; known: {', '.join(sorted(METHODS))}.")
    return METHODS[name](**data)


def peft_config_for(
    spec: MethodSpec, tokenizer_path: str, tokenizer_kwargs: dict[str, Any] | None = None
) -> Any:
    """The PEFT config of ``spec`` for a base model whose tokenizer is at ``tokenizer_path``.

    Most methods need nothing from the model; prompt tuning with ``init_text`` tokenizes the text with it.
    """
    if getattr(spec, "needs_tokenizer", False):
        return spec.to_peft_config(tokenizer_path=tokenizer_path, tokenizer_kwargs=tokenizer_kwargs)  # type: ignore[call-arg]
    return spec.to_peft_config()


def supports_grad_checkpointing(spec: MethodSpec) -> bool:
    """Whether ``spec`` trains with gradient checkpointing (prefix methods do not)."""
    return bool(getattr(spec, "supports_grad_checkpointing", True))


register_method("lora", LoraSpec)
register_method("ia3", Ia3Spec)
register_method("prompt_tuning", PromptTuningSpec)
register_method("adalora", AdaLoraSpec)
register_method("full", FullSpec)
register_method("ptuning", PtuningSpec)
register_method("prefix_tuning", PrefixTuningSpec)
register_method("ptuning_v2", PtuningV2Spec)

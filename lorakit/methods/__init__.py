"""Adapter methods: one module per method, one registry dict.

A method is a frozen attrs spec with a ``name``, ``to_peft_config()`` that builds the PEFT config (``None`` for
full fine-tuning, which trains the model itself), ``mergeable`` (whether its weights fold into the base; a full
fine-tuning run has nothing to fold), and ``to_dict()``. ``METHODS`` maps the name to the spec class so a run
config can rebuild it.

Each spec owns everything specific to its method through hooks (:class:`MethodSpec`); the builder, the plan,
``train()`` and the trainer call them and never test which method a spec is. Subclass
:class:`lorakit.methods.base.MethodBase` for the defaults and override what differs:

==========================  ================================================================================
plan side                   ``has_adapter``, ``needs_step_count``, ``supports_grad_checkpointing`` (flags);
                            ``builder_call()``, ``check_quantization(quant, final=)``, ``check_schedule(max_steps,
                            source)``, ``check_steps(total_steps)``, ``meta_peft_config()``, ``apply_on_meta(model)``,
                            ``plan_targets(model)``, ``base_of(model)``
train side                  ``check_run(context)`` (before any load), ``peft_config(context)``,
                            ``prepare_model(model)`` (before the trainer), ``setup_trainer(trainer, context)``,
                            ``callbacks()``, ``extra_loss(model)``, ``saving(model, checkpoint=)``,
                            ``resume_state(model)`` / ``load_resume_state(model, tensors, info)``
==========================  ================================================================================

``context`` is a :class:`lorakit.methods.base.MethodContext` (base path, revision, tokenizer kwargs, the run's
total optimizer steps, whether it resumes).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lorakit.errors import ConfigError
from lorakit.methods.adalora import AdaLoraSpec
from lorakit.methods.base import MethodBase, MethodContext
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
    "MethodBase",
    "MethodContext",
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
    """What the pipeline, the plan, ``train()`` and the trainer need from an adapter method spec (see the module
    docstring for what each hook does; :class:`MethodBase` has the defaults)."""

    name: str
    mergeable: bool
    has_adapter: bool
    needs_step_count: bool
    supports_grad_checkpointing: bool

    def to_peft_config(self) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def builder_call(self) -> str: ...

    def check_quantization(self, quant: Any, *, final: bool) -> None: ...

    def check_schedule(self, max_steps: int | None, source: Any) -> None: ...

    def check_steps(self, total_steps: int) -> None: ...

    def meta_peft_config(self) -> Any: ...

    def apply_on_meta(self, model: Any) -> Any: ...

    def plan_targets(self, model: Any) -> tuple[str, ...]: ...

    def base_of(self, model: Any) -> Any: ...

    def check_run(self, context: MethodContext) -> None: ...

    def peft_config(self, context: MethodContext) -> Any: ...

    def prepare_model(self, model: Any) -> Any: ...

    def setup_trainer(self, trainer: Any, context: MethodContext) -> None: ...

    def callbacks(self) -> list[Any]: ...

    def extra_loss(self, model: Any) -> Any: ...

    def saving(self, model: Any, *, checkpoint: bool) -> Any: ...

    def resume_state(self, model: Any) -> tuple[dict[str, Any], dict[str, Any]] | None: ...

    def load_resume_state(self, model: Any, tensors: dict[str, Any], info: dict[str, Any]) -> None: ...


HOOKS = tuple(
    name
    for name in MethodSpec.__dict__
    if not name.startswith("_") and callable(getattr(MethodBase, name, None))
)
"""The hook methods a registered spec class must have (inherit :class:`MethodBase` for the defaults)."""


METHODS: dict[str, type] = {}


def register_method(name: str, spec_cls: type) -> None:
    """Register an adapter method spec class under ``name``; names are unique."""
    if name in METHODS:
        raise ConfigError(
            f"An adapter method named {name!r} is already registered ({METHODS[name].__name__})."
        )
    missing = [hook for hook in HOOKS if not callable(getattr(spec_cls, hook, None))]
    if missing:
        raise ConfigError(
            f"register_method({name!r}, {spec_cls.__name__}): the class lacks the method hooks "
            f"{', '.join(missing)}. Subclass lorakit.methods.MethodBase for their defaults."
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
    return spec.peft_config(MethodContext(base_path=tokenizer_path, tokenizer_kwargs=tokenizer_kwargs or {}))


def supports_grad_checkpointing(spec: MethodSpec) -> bool:
    """Whether ``spec`` trains with gradient checkpointing (prefix methods do not)."""
    return bool(spec.supports_grad_checkpointing)


register_method("lora", LoraSpec)
register_method("ia3", Ia3Spec)
register_method("prompt_tuning", PromptTuningSpec)
register_method("adalora", AdaLoraSpec)
register_method("full", FullSpec)
register_method("ptuning", PtuningSpec)
register_method("prefix_tuning", PrefixTuningSpec)
register_method("ptuning_v2", PtuningV2Spec)

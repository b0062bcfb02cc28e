"""Full fine-tuning: train the model's own weights, no adapter; optionally only part of them (``freeze``).

``Pipeline.full_finetune()`` trains every parameter. ``Pipeline.freeze(train_last_n_layers=N)`` trains only the
last ``N`` decoder layers (and, with ``final_norm=True``, the final norm); ``freeze(modules=(...))`` trains only
the named modules. Everything else keeps ``requires_grad=False`` and stays bit-identical. The run directory holds
the whole model (``AutoModelForCausalLM.from_pretrained(run_dir)`` loads it): there is nothing to merge.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs

from lorakit.config import to_names
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase, MethodContext

__all__ = ["FullSpec", "apply_freeze", "trained_modules"]

_FINAL_NORM = re.compile(r"(^|\.)(norm|final_layernorm|final_layer_norm|ln_f|norm_f)$")
"""Names of the norm after the last decoder layer (Llama / Mistral / Qwen, Phi, GPT-2 / Falcon, ...)."""


@attrs.frozen
class FullSpec(MethodBase):
    """Full fine-tuning options: all parameters, the last N decoder layers, or named modules."""

    name: ClassVar[str] = "full"
    mergeable: ClassVar[bool] = False
    """Nothing to merge: the trained weights are the model. ``InferenceModel.merge()`` returns it unchanged."""

    train_last_n_layers: int | None = attrs.field(default=None)
    """Train only the last N decoder layers (``freeze(train_last_n_layers=N)``); None: no layer restriction."""
    modules: tuple[str, ...] | None = attrs.field(default=None, converter=to_names)
    """Train only these modules, e.g. ("lm_head",) or ("layers.1.mlp", "norm"); None: no module restriction."""
    final_norm: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    """With ``train_last_n_layers``: also train the norm after the last decoder layer."""

    @train_last_n_layers.validator
    def _check_layers(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"freeze(train_last_n_layers={value!r}) must be a positive number of decoder layers, e.g. 2."
            )
        if self.modules is not None:
            raise ConfigError(
                f"freeze(train_last_n_layers={value!r}, modules={self.modules!r}): pass exactly one of the two."
            )

    @modules.validator
    def _check_modules(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, tuple) or not value or not all(isinstance(m, str) and m for m in value):
            raise ConfigError(
                f"freeze(modules={value!r}) must be a non-empty tuple of module names, e.g. ('lm_head',)."
            )

    @property
    def freezes(self) -> bool:
        """True when only part of the model trains."""
        return self.train_last_n_layers is not None or self.modules is not None

    has_adapter: ClassVar[bool] = False

    def to_peft_config(self) -> None:
        """No PEFT config: SFTTrainer trains the model itself."""
        return None

    def builder_call(self) -> str:
        if self.train_last_n_layers is not None:
            return f"freeze(train_last_n_layers={self.train_last_n_layers})"
        if self.modules is not None:
            return f"freeze(modules={self.modules!r})"
        return "full_finetune()"

    def check_quantization(self, quant: Any, *, final: bool) -> None:
        if quant is not None:
            raise ConfigError(
                f"{self.builder_call()} cannot be combined with {quant.method_name}: bitsandbytes weights are "
                "frozen integers that full fine-tuning cannot update. Drop the quantization to fine-tune the "
                "weights, or keep it and train an adapter on the quantized base with with_lora() (QLoRA)."
            )

    def apply_on_meta(self, model: Any) -> Any:
        apply_freeze(model, self)
        return model

    def plan_targets(self, model: Any) -> tuple[str, ...]:
        return tuple(name or "all parameters" for name in trained_modules(model, self))

    def base_of(self, model: Any) -> Any:
        return model

    def peft_config(self, context: MethodContext) -> None:
        return None

    def prepare_model(self, model: Any) -> Any:
        """No adapter: the model's own weights train, all of them or the unfrozen part."""
        apply_freeze(model, self)
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_last_n_layers": self.train_last_n_layers,
            "modules": list(self.modules) if self.modules is not None else None,
            "final_norm": self.final_norm,
        }

    def describe(self) -> str:
        if self.train_last_n_layers is not None:
            norm = " + final norm" if self.final_norm else ""
            return f"full fine-tuning of the last {self.train_last_n_layers} decoder layer(s){norm}; the rest frozen"
        if self.modules is not None:
            return f"full fine-tuning of modules {', '.join(self.modules)}; the rest frozen"
        return "full fine-tuning (all parameters)"


def _decoder_layers(model: Any) -> tuple[str, int]:
    """(name, length) of the ModuleList holding the decoder layers, e.g. ("model.layers", 32)."""
    import torch

    expected = getattr(model.config, "num_hidden_layers", None)
    lists = [
        (n, len(m)) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
    ]
    for name, length in lists:
        if expected is None or length == expected:
            return name, length
    raise ConfigError(
        f"freeze(train_last_n_layers=...): cannot find the decoder layers of {type(model).__name__} "
        f"(config.num_hidden_layers={expected}). Use freeze(modules=(...)) with module names instead."
    )


def trained_modules(model: Any, spec: FullSpec) -> tuple[str, ...]:
    """Names of the modules whose parameters train (``("",)``: the whole model).

    Raises:
        ConfigError: ``train_last_n_layers`` exceeds the model's decoder layers, or a module name matches nothing.
    """
    if spec.train_last_n_layers is not None:
        layers, count = _decoder_layers(model)
        n = spec.train_last_n_layers
        if n > count:
            raise ConfigError(
                f"freeze(train_last_n_layers={n}): the model has {count} decoder layers; pick 1-{count} "
                f"(or full_finetune() to train all of them)."
            )
        names = [f"{layers}.{i}" for i in range(count - n, count)]
        if spec.final_norm:
            names += [
                name
                for name, _ in model.named_modules()
                if _FINAL_NORM.search(name) and not name.startswith(layers + ".")
            ]
        return tuple(names)
    if spec.modules is not None:
        all_names = [name for name, _ in model.named_modules() if name]
        found: list[str] = []
        for wanted in spec.modules:
            matches = [name for name in all_names if name == wanted or name.endswith("." + wanted)]
            if not matches:
                top = sorted({name.rsplit(".", 1)[-1] for name in all_names if not name[-1].isdigit()})
                raise ConfigError(
                    f"freeze(modules=({wanted!r}, ...)): no module of {type(model).__name__} is named {wanted!r} "
                    f"(a full name or its last parts, e.g. 'lm_head', 'model.norm', 'layers.1.mlp'). "
                    f"Module names in this model: {', '.join(top)}."
                )
            found += [m for m in matches if m not in found]
        return tuple(found)
    return ("",)


def apply_freeze(model: Any, spec: FullSpec) -> tuple[str, ...]:
    """Set ``requires_grad`` so that only the modules of ``spec`` train; returns their names."""
    names = trained_modules(model, spec)
    for param in model.parameters():
        param.requires_grad = False
    for name in names:
        for param in model.get_submodule(name).parameters():
            param.requires_grad = True
    return names

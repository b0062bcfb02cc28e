"""The resolved plan of a pipeline, computed without loading weights (model config + meta device)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.memory import MemoryEstimate
    from lorakit.pipeline import Pipeline

__all__ = ["Plan", "make_plan", "steps_for"]


@attrs.frozen
class Plan:
    """What ``train()`` would do, with exact parameter counts."""

    model: str
    architecture: str
    method: str
    quantization: str
    target_modules: tuple[str, ...]
    total_params: int
    trainable_params: int
    device: str
    precision: str
    template: str
    train_rows: int | None
    val_rows: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    memory: MemoryEstimate | None = None
    """Bytes of weights, adapter, gradients, optimizer state and activations (``lorakit.memory``)."""

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def render(self) -> str:
        rows = "no dataset yet (.with_dataset(...))"
        steps = "-"
        if self.train_rows is not None:
            rows = f"{self.train_rows} train / {self.val_rows} validation"
            steps = f"{self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch)"
        lines = [
            "lorakit plan",
            f"  model            {self.model} ({self.architecture})",
            f"  method           {self.method}",
            f"  quantization     {self.quantization}",
            f"  target modules   {', '.join(self.target_modules)}",
            f"  parameters       {self.trainable_params:,} trainable / {self.total_params:,} total "
            f"({100 * self.trainable_fraction:.3f}%)",
            f"  device           {self.device}, {self.precision}",
            f"  template         {self.template}",
            f"  data             {rows}",
            f"  steps            {steps}",
        ]
        if self.memory is not None:
            lines.append(f"  memory           {self.memory.render()}")
        return "\n".join(lines)


def steps_for(
    train_rows: int,
    *,
    batch_size: int,
    grad_accum: int,
    epochs: float,
    max_steps: int | None,
    world_size: int = 1,
) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps), counted the way transformers' Trainer counts them."""
    batches = math.ceil(train_rows / (batch_size * world_size))
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    total = max_steps if max_steps is not None else math.ceil(epochs * per_epoch)
    return per_epoch, total


def _linear_module_names(model: Any) -> list[str]:
    import torch

    names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    return sorted(names)


def apply_method_on_meta(pipeline: Pipeline, config: Any) -> tuple[Any, int]:
    """Build the model on the meta device, apply the method, and return (model, base param count).

    The model is a PEFT model for adapter methods; for full fine-tuning (``FullSpec``) it is the plain model with
    ``requires_grad`` set as training will set it (``freeze()`` errors, e.g. too many layers, raise here).
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.methods.full import FullSpec, apply_freeze

    assert pipeline.model is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=pipeline.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    linear = _linear_module_names(model)
    method = pipeline.resolved_method
    if isinstance(method, FullSpec):
        apply_freeze(model, method)
        return model, total
    try:
        meta_config = getattr(method, "meta_peft_config", method.to_peft_config)
        peft_model = get_peft_model(model, meta_config())
        for name, param in peft_model.named_parameters():
            if ".ranknum." in name:  # AdaLoRA's rank constant; moving it to the meta device made it trainable
                param.requires_grad = False
    except ValueError as error:
        if "not found in the base model" in str(error) or "Target modules" in str(error):
            raise ConfigError(
                f"with_{method.name}(targets={method.to_dict().get('targets')!r}) matches no module of "
                f"{pipeline.model.name_or_path}. Its linear modules are: {', '.join(linear)}. "
                "Use targets='all-linear' or names from that list."
            ) from error
        raise
    return peft_model, total


def _method_text(pipeline: Pipeline) -> str:
    from lorakit.methods import supports_grad_checkpointing

    method = pipeline.resolved_method
    text = method.describe() + ("" if pipeline.method is not None else " (default)")
    if not supports_grad_checkpointing(method):
        text += " (gradient checkpointing off: not supported by prefix methods)"
    return text


def make_plan(pipeline: Pipeline) -> Plan:
    from lorakit.data import count_rows
    from lorakit.memory import estimate_memory
    from lorakit.methods.adalora import AdaLoraSpec
    from lorakit.methods.full import FullSpec, trained_modules
    from lorakit.models import device_kind, load_model_config, resolve_precision
    from lorakit.templates import get_template

    pipeline.require(data=False)
    assert pipeline.model is not None
    config = load_model_config(pipeline.model)
    peft_model, total = apply_method_on_meta(pipeline, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    targeted = getattr(peft_model, "targeted_module_names", None) or []  # prompt-based methods target none
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in targeted}))
    method_spec = pipeline.resolved_method
    if isinstance(method_spec, FullSpec):  # no adapter: the modules trained in full
        targets = tuple(name or "all parameters" for name in trained_modules(peft_model, method_spec))
    base_model = peft_model if isinstance(method_spec, FullSpec) else peft_model.get_base_model()

    train_rows = val_rows = per_epoch = total_steps = None
    template = "-"
    if pipeline.data is not None:
        spec = pipeline.data
        train_rows, val_rows = count_rows(spec.source, **spec.prepare_kwargs())
        t = pipeline.training
        per_epoch, total_steps = steps_for(
            train_rows,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            epochs=t.epochs,
            max_steps=t.max_steps,
        )
        template = getattr(get_template(spec.template), "name", type(spec.template).__name__)
        if isinstance(method_spec, AdaLoraSpec):  # its schedule must fit in the run
            method_spec.check_steps(total_steps)

    quant = pipeline.quant
    quant_text = "none"
    if quant is not None:
        quant_text = f"{quant.bits}-bit bitsandbytes" + (
            f" ({quant.quant_type}, double quant {'on' if quant.double_quant else 'off'})"
            if quant.bits == 4
            else ""
        )
    precision = resolve_precision(pipeline.training.precision)
    device = device_kind()
    memory = estimate_memory(pipeline, peft_model, config, precision=precision, device=device)
    return Plan(
        model=pipeline.model.name_or_path,
        architecture=type(base_model).__name__,
        method=_method_text(pipeline),
        quantization=quant_text,
        target_modules=targets,
        total_params=total,
        trainable_params=trainable,
        device=device,
        precision=precision,
        template=template,
        train_rows=train_rows,
        val_rows=val_rows,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        memory=memory,
    )

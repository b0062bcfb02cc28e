"""The resolved plan of a pipeline, computed without loading weights (model config + meta device)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import TrainSpec
from lorakit.data import count_rows
from lorakit.data.preference import count_preference_rows
from lorakit.errors import ConfigError
from lorakit.memory import MemoryEstimate, estimate_memory
from lorakit.methods import MethodSpec, supports_grad_checkpointing
from lorakit.models import device_kind, load_model_config, resolve_precision
from lorakit.preference import adjust_memory, plan_lines
from lorakit.templates import get_template

if TYPE_CHECKING:
    from lorakit.distributed import DistributedSpec
    from lorakit.pipeline import Pipeline

__all__ = ["GradCheckpointing", "Plan", "decide_grad_checkpointing", "make_plan", "steps_for"]


# --- decisions ----------------------------------------------------------------------------------------------


@attrs.frozen
class GradCheckpointing:
    """Whether activations are recomputed in the backward pass, and why (see :func:`decide_grad_checkpointing`)."""

    on: bool
    """Activations are checkpointed (by the Trainer / PEFT, or by FSDP when ``by_fsdp``)."""
    reason: str
    """The decision and why, as ``explain()`` shows it: ``"on (CUDA)"``, ``"off (CPU)"``,
    ``"off (grad_checkpointing=False)"``, ``"off: prefix_tuning cannot train with it"``."""
    by_fsdp: bool = False
    """FSDP's own activation checkpointing does it; the Trainer's ``gradient_checkpointing`` stays off."""
    note: str | None = None
    """Printed when training starts: lorakit turned off what the request or the default would have turned on."""

    @property
    def trainer(self) -> bool:
        """The value of the Trainer's ``gradient_checkpointing`` argument."""
        return self.on and not self.by_fsdp


def decide_grad_checkpointing(
    training: TrainSpec, method: MethodSpec, device: str, distribution: DistributedSpec | None = None
) -> GradCheckpointing:
    """The one decision on gradient checkpointing, from the training spec, the method that will train, the
    device kind (``"cuda"`` / ``"cpu"``) and the distributed set-up.

    ``grad_checkpointing=None`` means on for CUDA, off elsewhere; ``True`` / ``False`` are kept. Prefix methods
    cannot train with it (an explicit ``True`` was refused at the builder call), so it is off for them. With
    FSDP, FSDP's own activation checkpointing replaces the Trainer's (which would cost an extra AllGather).

    Example:
        >>> from lorakit.config import TrainSpec
        >>> from lorakit.methods import LoraSpec
        >>> decide_grad_checkpointing(TrainSpec(), LoraSpec(), "cpu").reason
        'off (CPU)'
    """
    requested = training.grad_checkpointing
    wanted = requested if requested is not None else device == "cuda"
    if not supports_grad_checkpointing(method):
        reason = f"{method.name} cannot train with it"
        note = None
        if wanted:
            note = (
                f"gradient checkpointing off: {reason} (PEFT's prefix key/values and the recomputed forward "
                "disagree on sequence lengths); see docs/methods.md."
            )
        return GradCheckpointing(False, f"off: {reason}", note=note)
    why = f"grad_checkpointing={requested}" if requested is not None else device.upper()
    if wanted and distribution is not None and distribution.strategy == "fsdp":
        return GradCheckpointing(
            True, f"on ({why}): FSDP's activation checkpointing, not the Trainer's", by_fsdp=True
        )
    return GradCheckpointing(wanted, f"{'on' if wanted else 'off'} ({why})")


# --- the plan -----------------------------------------------------------------------------------------------


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
    grad_checkpointing: GradCheckpointing | None = None
    """The gradient checkpointing decision and its reason (:func:`decide_grad_checkpointing`)."""
    preference: tuple[str, ...] = ()
    """The preference objective's lines (objective, beta, reference), empty for SFT."""

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
            *self.preference,
        ]
        if self.grad_checkpointing is not None:
            lines.append(f"  grad checkpoint  {self.grad_checkpointing.reason}")
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

    The model is what the method's ``apply_on_meta`` hook returns: a PEFT model for adapter methods; for full
    fine-tuning the plain model with ``requires_grad`` set as training will set it (``freeze()`` errors, e.g.
    too many layers, raise here).
    """
    import torch
    from transformers import AutoModelForCausalLM

    assert pipeline.model is not None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=pipeline.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    linear = _linear_module_names(model)
    method = pipeline.resolved_method
    try:
        applied = method.apply_on_meta(model)
    except ConfigError:
        raise
    except ValueError as error:
        if "not found in the base model" in str(error) or "Target modules" in str(error):
            raise ConfigError(
                f"with_{method.name}(targets={method.to_dict().get('targets')!r}) matches no module of "
                f"{pipeline.model.name_or_path}. Its linear modules are: {', '.join(linear)}. "
                "Use targets='all-linear' or names from that list."
            ) from error
        raise
    return applied, total


def _method_text(pipeline: Pipeline) -> str:
    return pipeline.resolved_method.describe() + ("" if pipeline.method is not None else " (default)")


def _quant_text(pipeline: Pipeline) -> str:
    quant = pipeline.quant
    if quant is None:
        return "none"
    details = f" ({quant.quant_type}, double quant {'on' if quant.double_quant else 'off'})"
    return f"{quant.bits}-bit bitsandbytes" + (details if quant.bits == 4 else "")


def _data_plan(pipeline: Pipeline) -> dict[str, Any]:
    """Rows, steps and template name of the pipeline's data (``None`` / ``"-"`` without data)."""
    if pipeline.data is None:
        return {
            "train_rows": None,
            "val_rows": None,
            "steps_per_epoch": None,
            "total_steps": None,
            "template": "-",
        }
    spec, t = pipeline.data, pipeline.training
    if pipeline.preference is not None:
        train_rows, val_rows = count_preference_rows(
            spec.source, val_split=spec.val_split, seed=spec.seed, val_source=spec.val
        )
    else:
        train_rows, val_rows = count_rows(spec.source, **spec.prepare_kwargs())
    per_epoch, total_steps = steps_for(
        train_rows, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs, max_steps=t.max_steps
    )
    pipeline.resolved_method.check_steps(total_steps)  # the method's schedule must fit in the run
    return {
        "train_rows": train_rows,
        "val_rows": val_rows,
        "steps_per_epoch": per_epoch,
        "total_steps": total_steps,
        "template": getattr(get_template(spec.template), "name", type(spec.template).__name__),
    }


def make_plan(pipeline: Pipeline) -> Plan:
    """The :class:`Plan` of ``pipeline``: model config and the method on the meta device, no weights loaded."""
    pipeline.require(data=False)
    assert pipeline.model is not None
    config = load_model_config(pipeline.model)
    peft_model, total = apply_method_on_meta(pipeline, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    method_spec = pipeline.resolved_method
    targets = method_spec.plan_targets(peft_model)
    base_model = method_spec.base_of(peft_model)
    precision = resolve_precision(pipeline.training.precision)
    device = device_kind()
    grad_ckpt = decide_grad_checkpointing(pipeline.training, method_spec, device, pipeline.distribution)
    memory = estimate_memory(
        pipeline, peft_model, config, precision=precision, device=device, grad_checkpointing=grad_ckpt.on
    )
    preference = ()
    if pipeline.preference is not None:
        memory = adjust_memory(memory, pipeline.preference, pipeline.start)
        preference = tuple(plan_lines(pipeline.preference, pipeline.start))
    return Plan(
        model=pipeline.model.name_or_path,
        architecture=type(base_model).__name__,
        method=_method_text(pipeline),
        quantization=_quant_text(pipeline),
        target_modules=targets,
        total_params=total,
        trainable_params=trainable,
        device=device,
        precision=precision,
        **_data_plan(pipeline),
        memory=memory,
        grad_checkpointing=grad_ckpt,
        preference=preference,
    )

"""The resolved plan of a pipeline, computed without loading weights (model config + meta device)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import DataSpec, TrainSpec
from lorakit.data import count_rows
from lorakit.errors import ConfigError
from lorakit.memory import MemoryEstimate, estimate_memory
from lorakit.methods import MethodSpec, supports_grad_checkpointing
from lorakit.models import device_kind, load_model_config, resolve_precision
from lorakit.templates import get_template

if TYPE_CHECKING:
    from lorakit.distributed import DistributedSpec
    from lorakit.pipeline import Pipeline

__all__ = [
    "GradCheckpointing",
    "Plan",
    "check_context",
    "decide_grad_checkpointing",
    "make_plan",
    "model_context",
    "save_bytes",
    "steps_for",
]

_DEFAULT_MAX_LENGTH = attrs.fields(DataSpec).max_length.default


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
        >>> from lorakit.config import DataSpec, TrainSpec
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
    speed: str | None = None
    """The step's speed paths: optimizer, fused loss, compile (:func:`describe_speed`)."""

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
        if self.grad_checkpointing is not None:
            lines.append(f"  grad checkpoint  {self.grad_checkpointing.reason}")
        if self.speed is not None:
            lines.append(f"  step             {self.speed}")
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


def save_bytes(
    pipeline: Pipeline, peft_model: Any, config: Any, *, precision: str, device: str
) -> tuple[int, int]:
    """(bytes of the run's saved weights, bytes of one checkpoint): the adapter (the whole model for full
    fine-tuning), and a checkpoint adds the optimizer state (:func:`lorakit.memory.estimate_memory`)."""
    memory = estimate_memory(
        pipeline, peft_model, config, precision=precision, device=device, grad_checkpointing=False
    )
    saved = memory.adapter + (memory.weights if memory.trained_label != "adapter" else 0)
    return saved, saved + memory.optimizer


def _linear_module_names(model: Any) -> list[str]:
    import torch

    names = {
        name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    return sorted(names)


_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(config: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` or its older spellings)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text_config, config):
        for field in _CONTEXT_FIELDS:
            value = getattr(source, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context(pipeline: Pipeline, config: Any) -> None:
    """``with_dataset(max_length=...)`` must fit the model's context (packed rows fill all of it).

    An explicit value beyond it is a :class:`ConfigError`; the untouched default (1024) beyond a smaller
    context is a warning (rows up to the context train as before; longer ones would run past it).
    """
    data, context = pipeline.data, model_context(config)
    if data is None or context is None or data.max_length <= context:
        return
    assert pipeline.model is not None
    default = data.max_length == _DEFAULT_MAX_LENGTH
    setting = (
        f"The default max_length={data.max_length}"
        if default
        else f"with_dataset(max_length={data.max_length})"
    )
    what = "packed sequences fill" if data.packing else "rows may reach"
    message = (
        f"{setting} is beyond the context of {pipeline.model.name_or_path} ({context} positions, "
        f"max_position_embeddings): {what} {data.max_length} tokens, past every position the model was "
        f"trained on. Use with_dataset(max_length={context}) or less."
    )
    if default:
        warnings.warn(message, stacklevel=4)
        return
    raise ConfigError(message)


def apply_method_on_meta(pipeline: Pipeline, config: Any) -> tuple[Any, int]:
    """Build the model on the meta device, apply the method, and return (model, base param count).

    The model is what the method's ``apply_on_meta`` hook returns: a PEFT model for adapter methods; for full
    fine-tuning the plain model with ``requires_grad`` set as training will set it (``freeze()`` errors, e.g.
    too many layers, raise here).
    """
    import torch
    from transformers import AutoModelForCausalLM

    assert pipeline.model is not None
    check_context(pipeline, config)  # plan() and train() both pass here before any weight loads
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
        speed=describe_speed(pipeline.training, device),
    )


def describe_speed(train: Any, device: str) -> str:
    """One line for ``explain()``: the optimizer, whether the fused loss and ``torch.compile`` are on, and why."""
    compiled = train.compile is True or (train.compile == "auto" and device == "cuda")
    why = {True: "compile=True", False: "compile=False", "auto": f"compile='auto' on {device}"}[train.compile]
    loss = "fused linear cross-entropy" if train.fused_loss else "TRL's loss (fused_loss=False)"
    return (
        f"optim {train.optim}, {loss} (where the head allows), compile {'on' if compiled else 'off'} ({why})"
    )

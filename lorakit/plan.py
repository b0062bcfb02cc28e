"""The resolved plan of a pipeline, computed without loading weights (model config + meta device)."""

from __future__ import annotations

import math
import warnings
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import DataSpec, HubDataset, QuantSpec, TrainSpec
from lorakit.data import count_rows
from lorakit.data.preference import count_preference_rows
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.memory import MemoryEstimate, decide_frozen_bf16, estimate_memory
from lorakit.methods import MethodSpec, supports_grad_checkpointing
from lorakit.models import (
    DeviceInfo,
    check_model_options,
    current_device,
    decide_attention,
    decide_precision,
    hidden_size_of,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
)
from lorakit.preference import adjust_memory, plan_lines
from lorakit.templates import describe_template, get_template

if TYPE_CHECKING:
    from lorakit.distributed import DistributedSpec
    from lorakit.pipeline import Pipeline

__all__ = [
    "FastPaths",
    "GradCheckpointing",
    "Plan",
    "check_context",
    "check_stream",
    "decide_fast_paths",
    "decide_grad_checkpointing",
    "decide_liger",
    "decide_optimizer",
    "decide_padding_free",
    "make_plan",
    "model_context",
    "resolve_for_run",
    "save_bytes",
    "steps_for",
    "stream_rows",
    "with_optimizer",
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


@attrs.frozen
class FastPaths:
    """The GPU fast paths a run uses, each with its reason (see :func:`decide_fast_paths`)."""

    attention: str | None
    """``attn_implementation`` passed to ``from_pretrained``; None keeps transformers' default (SDPA)."""
    attention_reason: str
    padding_free: str
    """Whether batches are padding-free (packed, per-example ``position_ids``) and how."""
    liger: bool
    """TRL's ``use_liger_kernel``."""
    liger_reason: str
    optim: str
    """The optimizer the Trainer gets."""
    optim_reason: str

    def lines(self) -> list[str]:
        """The ``explain()`` lines."""
        return [
            f"  attention        {self.attention_reason}",
            f"  padding-free     {self.padding_free}",
            f"  liger kernels    {self.liger_reason}",
            f"  optimizer        {self.optim_reason}",
        ]


def decide_optimizer(requested: str, quant: QuantSpec | None, device: DeviceInfo) -> tuple[str, str]:
    """The one optimizer decision. ``optim="auto"`` (the default): paged 8-bit AdamW for QLoRA on a GPU (state
    paged to CPU memory at peaks), else ``adamw_torch_fused``; an explicit name is kept. Returns (optimizer,
    reason). The recorded pipeline config keeps ``"auto"``; the run record's ``optimizer`` says what it became.

    Example:
        >>> decide_optimizer("auto", None, DeviceInfo("cpu", "CPU"))
        ('adamw_torch_fused', 'adamw_torch_fused (auto: fused AdamW; paged 8-bit AdamW is for QLoRA on a GPU)')
    """
    qlora_on_gpu = quant is not None and quant.bits == 4 and device.kind == "cuda"
    if requested != "auto":
        hint = "; optim='auto' picks paged_adamw_8bit for QLoRA on a GPU" if qlora_on_gpu else ""
        return requested, f"{requested}{hint if not requested.startswith('paged_') else ''}"
    if qlora_on_gpu:
        return "paged_adamw_8bit", "paged_adamw_8bit (auto: QLoRA on a GPU)"
    return (
        "adamw_torch_fused",
        "adamw_torch_fused (auto: fused AdamW; paged 8-bit AdamW is for QLoRA on a GPU)",
    )


def with_optimizer(pipeline: Pipeline, device: DeviceInfo) -> Pipeline:
    """``pipeline`` with ``optim="auto"`` made concrete by :func:`decide_optimizer`, for what sizes the run
    (memory and checkpoint estimates, the step line of ``explain()``); never recorded (the config keeps "auto")."""
    optim, _ = decide_optimizer(pipeline.training.optim, pipeline.quant, device)
    return attrs.evolve(pipeline, training=attrs.evolve(pipeline.training, optim=optim))


def decide_padding_free(
    requested: bool | str, *, packing: bool, attention: str | None, preference: bool = False
) -> tuple[bool, str]:
    """The one padding-free decision: whether each batch is concatenated into one row with per-example
    ``position_ids`` (:class:`lorakit.collate.PaddingFreeCollator`), and why. ``attention`` is the
    ``attn_implementation`` the model loads with (None: transformers' default, SDPA).

    ``"auto"``: on with flash-attention 2 (variable-length kernels: no mask, no padding computed); off with SDPA /
    eager, which then need a block-diagonal mask over the whole concatenated batch (quadratic in the batch's
    total tokens), so padded length-grouped batches cost less. ``True`` forces it (exact: examples never attend
    to each other). Packed rows (``packing=True``) are always padding-free.

    Raises:
        ConfigError: ``padding_free=False`` with ``packing=True``, or ``True`` with a preference objective.

    Example:
        >>> decide_padding_free(True, packing=False, attention=None)[0]
        True
    """
    kernel = "flash-attention varlen kernels" if attention == "flash_attention_2" else "block-diagonal mask"
    if packing:
        if requested is False:
            raise ConfigError(
                "with_training(padding_free=False) contradicts with_dataset(packing=True): packed rows are "
                "always padding-free. Drop padding_free=False, or use packing=False."
            )
        return True, f"on (packing=True: per-example position_ids, {kernel})"
    if preference:
        if requested is True:
            raise ConfigError(
                "with_training(padding_free=True): preference objectives batch chosen / rejected pairs with "
                "TRL's collator, which lorakit does not concatenate. Use padding_free='auto' or False."
            )
        return False, "off (preference objectives batch with TRL's collator)"
    if requested is True:
        return True, f"on (padding_free=True: each batch is one row with per-example position_ids, {kernel})"
    if requested is False:
        return False, "off (padding_free=False: padded batches)"
    if attention == "flash_attention_2":
        return True, "on (auto: flash_attention_2 runs the concatenated batch as variable-length sequences)"
    return False, (
        f"off (auto: {attention or 'sdpa'} would need a block-diagonal mask over the concatenated batch; "
        "padded length-grouped batches cost less; padding_free=True forces it)"
    )


def decide_liger(requested: bool | None, device: DeviceInfo) -> tuple[bool, str]:
    """Liger kernels (TRL's ``use_liger_kernel``): ``None`` = on for GPU runs with ``liger_kernel`` installed.

    Raises:
        ConfigError / MissingDependencyError: ``liger=True`` on a CPU, or without the package.
    """
    installed = find_spec("liger_kernel") is not None
    if requested is None:
        if device.kind == "cuda" and installed:
            return True, "on (auto: liger_kernel installed, GPU run)"
        return False, f"off (auto: {'liger_kernel not installed' if device.kind == 'cuda' else 'CPU run'})"
    if requested and device.kind != "cuda":
        raise ConfigError(
            f"with_training(liger=True): Liger kernels are Triton GPU kernels; this run is on "
            f"{device.describe()}. Use liger=None (auto) or False."
        )
    if requested and not installed:
        raise MissingDependencyError("with_training(liger=True) needs liger-kernel: pip install liger-kernel")
    return requested, f"{'on' if requested else 'off'} (requested)"


def decide_fast_paths(pipeline: Pipeline, device: DeviceInfo) -> FastPaths:
    """Attention kernel, padding-free batches, Liger kernels and optimizer of ``pipeline`` on ``device``."""
    assert pipeline.model is not None
    attention, attention_reason = decide_attention(pipeline.model.attention, device)
    packing = pipeline.data is not None and pipeline.data.packing
    _, padding_free = decide_padding_free(
        pipeline.training.padding_free,
        packing=packing,
        attention=attention,
        preference=pipeline.preference is not None,
    )
    liger, liger_reason = decide_liger(pipeline.training.liger, device)
    optim, optim_reason = decide_optimizer(pipeline.training.optim, pipeline.quant, device)
    return FastPaths(attention, attention_reason, padding_free, liger, liger_reason, optim, optim_reason)


def resolve_for_run(pipeline: Pipeline, device: DeviceInfo) -> Pipeline:
    """``pipeline`` as a run reads it: a streamed Hub dataset reads only the rows ``max_steps`` consumes
    (:func:`stream_rows`). ``optim="auto"`` stays "auto" (the recorded config keeps it; see
    :func:`with_optimizer`).

    Raises:
        ConfigError: a streamed dataset without ``max_steps`` (a stream has no length to count epochs in), or
            with what a stream cannot do (packing, checkpoints; see :func:`check_stream`).
    """
    training = pipeline.training
    data = pipeline.data
    if data is not None and data.streaming:
        check_stream(pipeline)
        source = data.source
        assert isinstance(source, HubDataset) and training.max_steps is not None
        consumed, held_out = stream_rows(training, data)
        data = attrs.evolve(data, source=source.with_max_rows(consumed + held_out))
    return attrs.evolve(pipeline, training=training, data=data)


def stream_rows(training: TrainSpec, data: DataSpec) -> tuple[int, int]:
    """(training examples ``max_steps`` consumes, validation rows held out at the head of a stream): with
    ``val_split`` the head holds the split's share of both (``val=...`` or ``val_split=0``: none)."""
    assert training.max_steps is not None
    consumed = training.max_steps * training.batch_size * training.grad_accum
    if data.val is not None or data.val_split == 0:
        return consumed, 0
    return consumed, math.ceil(consumed / (1.0 - data.val_split)) - consumed


def check_stream(pipeline: Pipeline) -> None:
    """What a streamed dataset needs (``max_steps``) and cannot do yet (packing, checkpoints / resume).

    Raises:
        ConfigError: naming the setting and the fix.
    """
    training, data = pipeline.training, pipeline.data
    assert data is not None
    if training.max_steps is None:
        raise ConfigError(
            "with_dataset(streaming=True) streams rows without counting them, so epochs cannot be "
            "counted: set with_training(max_steps=...)."
        )
    if pipeline.preference is not None:
        return  # preference rows are read (the rows max_steps consumes) and prepared in memory
    if data.packing:
        raise ConfigError(
            "with_dataset(streaming=True, packing=True): streamed rows are encoded as they are read and are "
            "not packed. Drop packing=True (with_training(padding_free=True) also avoids padding)."
        )
    if training.save_steps is not None or pipeline.checkpoints is not None:
        raise ConfigError(
            "with_dataset(streaming=True) with checkpoints (save_steps / with_checkpoints): resuming a stream "
            "needs its read position, which lorakit does not record yet. Drop the checkpoints, or stream "
            "without them."
        )


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
    device_detail: str | None = None
    """The device as ``explain()`` names it, e.g. ``"cuda (Tesla T4, compute capability 7.5, 15.8 GB)"``."""
    precision_reason: str | None = None
    """The precision and why (:func:`lorakit.models.decide_precision`)."""
    fast_paths: FastPaths | None = None
    """Attention kernel, padding-free batches, Liger kernels, optimizer (:func:`decide_fast_paths`)."""
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
            f"  device           {self.device_detail or self.device}",
            f"  precision        {self.precision_reason or self.precision}",
            f"  template         {self.template}",
            f"  data             {rows}",
            f"  steps            {steps}",
            *self.preference,
        ]
        if self.grad_checkpointing is not None:
            lines.append(f"  grad checkpoint  {self.grad_checkpointing.reason}")
        if self.speed is not None:
            lines.append(f"  step             {self.speed}")
        if self.fast_paths is not None:
            lines.extend(self.fast_paths.lines())
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
    if spec.streaming and pipeline.preference is None:  # counted, not read: a stream is read while training
        train_rows, val_rows = stream_rows(t, spec)
        if spec.val is not None:
            val_rows = count_rows(spec.val, val_split=0.0, seed=spec.seed)[0]
    elif pipeline.preference is not None:
        train_rows, val_rows = count_preference_rows(  # KTO on paired rows: each pair is two rows
            spec.source,
            val_split=spec.val_split,
            seed=spec.seed,
            val_source=spec.val,
            paired=pipeline.preference.info.paired,
            columns=spec.column_map or None,
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
        "template": _template_text(pipeline),
    }


def _template_text(pipeline: Pipeline) -> str:
    """The template's name; ``"auto"`` with what it resolves to for this model's tokenizer."""
    assert pipeline.data is not None and pipeline.model is not None
    template = get_template(pipeline.data.template)
    if getattr(template, "name", None) != "auto":
        return getattr(template, "name", type(template).__name__)
    tokenizer = load_tokenizer(resolve_model_path(pipeline.model), pipeline.model)
    return describe_template(template, tokenizer)


def make_plan(pipeline: Pipeline) -> Plan:
    """The :class:`Plan` of ``pipeline``: model config and the method on the meta device, no weights loaded."""
    pipeline.require(data=False)
    assert pipeline.model is not None
    info = current_device()
    fast_paths = decide_fast_paths(pipeline, info)  # before "auto" values are made concrete: says why
    pipeline = with_optimizer(resolve_for_run(pipeline, info), info)  # sizes the optimizer it becomes
    config = load_model_config(pipeline.model)
    if pipeline.model.options:
        check_model_options(pipeline.model.option_dict, config)
    peft_model, total = apply_method_on_meta(pipeline, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    method_spec = pipeline.resolved_method
    targets = method_spec.plan_targets(peft_model)
    base_model = method_spec.base_of(peft_model)
    decision = decide_precision(pipeline.training.precision, info, hidden_size_of(config))
    precision, device = decision.precision, info.kind
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
        speed=describe_speed(pipeline, precision, device),
        device_detail=info.describe(),
        precision_reason=_precision_text(decision, pipeline),
        fast_paths=_with_default_attention(fast_paths, base_model),
        preference=preference,
    )


def describe_speed(pipeline: Pipeline, precision: str, device: str) -> str:
    """One line for ``explain()``: the optimizer, whether the fused loss and ``torch.compile`` are on, and why;
    on a CPU the dropout masks and the frozen weights in bf16 (:mod:`lorakit.fused`)."""
    train = pipeline.training
    compiled = train.compile is True or (train.compile == "auto" and device == "cuda")
    why = {True: "compile=True", False: "compile=False", "auto": f"compile='auto' on {device}"}[train.compile]
    loss = "fused linear cross-entropy" if train.fused_loss else "TRL's loss (fused_loss=False)"
    parts = [f"optim {train.optim}", f"{loss} (where the head allows)"]
    if device == "cpu" and pipeline.resolved_method.dropout_masks:
        parts.append("bool dropout masks")
    if decide_frozen_bf16(pipeline, precision, device):
        parts.append("frozen weights in bf16")
    return ", ".join(parts) + f", compile {'on' if compiled else 'off'} ({why})"


def _with_default_attention(paths: FastPaths, model: Any) -> FastPaths:
    """Name the attention transformers' default picked for this model (SDPA, or eager where it has none)."""
    chosen = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if paths.attention is not None or not chosen or paths.attention_reason.startswith(chosen):
        return paths
    return attrs.evolve(paths, attention_reason=chosen + paths.attention_reason[len("sdpa") :])


def _precision_text(decision: Any, pipeline: Pipeline) -> str:
    """The precision line: the decision's reason, the 4-bit compute dtype and the adapter dtype."""
    text = decision.reason
    quant = pipeline.quant
    if quant is not None and quant.bits == 4:
        text += f"; 4-bit compute dtype {quant.compute_dtype or decision.compute_dtype}"
    if quant is not None:
        text += f"; adapter {decision.adapter_dtype(quantized=True)}"
    return text

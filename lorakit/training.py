"""``Pipeline.train()``, in named phases read top to bottom:

resolve (check everything that can be checked before loading anything) -> data (tokenizer and tokenized rows:
data errors surface before the slow weight load) -> load (the base model, prepared by the method) -> trainer
(:class:`lorakit.trainer.LorakitTrainer` with the method's hooks) -> fit -> save.

This module imports :mod:`lorakit.trainer`, hence torch, transformers and TRL; ``import lorakit`` does not
import it (``Pipeline.train()`` and ``lorakit.TrainResult`` load it on first use).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from transformers import TrainerCallback

from lorakit import __version__, noise
from lorakit import checkpoints as ckpt
from lorakit import trainer as trainers
from lorakit.collate import PadCollator, PaddingFreeCollator
from lorakit.config import eval_key
from lorakit.console import (
    TrainingConsole,
    final_summary,
    live_output,
    plan_summary,
    remove_default_printers,
)
from lorakit.data import prepare_data
from lorakit.data.preference import prepare_preference_data
from lorakit.data.stream import StreamedData, prepare_stream
from lorakit.distributed import (
    check_launch,
    is_main_process,
    preflight,
    quantization_storage,
    training_arguments,
)
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.evaluation import GenerationSet, TrainingEvaluator, sample_callback, sample_prompts
from lorakit.fused import compile_blocks, store_frozen_bf16, use_mask_dropout
from lorakit.memory import decide_frozen_bf16, estimate_memory, format_bytes
from lorakit.methods.base import MethodContext
from lorakit.metrics import get_metric, missing_packages
from lorakit.modelcard import write_run_card
from lorakit.models import (
    current_device,
    decide_attention,
    device_kind,
    hidden_size_of,
    load_base_model,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
    torch_dtype,
)
from lorakit.plan import (
    apply_method_on_meta,
    decide_grad_checkpointing,
    decide_padding_free,
    save_bytes,
    steps_for,
    stream_rows,
    with_optimizer,
)
from lorakit.preference import REFERENCE_ADAPTER, eval_keys
from lorakit.progress import progress_enabled
from lorakit.rundir import (
    RUN_FILE,
    RunDir,
    check_free_space,
    checkpoint_step,
    checksums,
    find_resume_checkpoint,
    storage_guard,
)
from lorakit.runlock import RunLock
from lorakit.templates import get_template
from lorakit.tracking import Tracker, report_data, summary_html, write_run_report
from lorakit.tracking.secrets import redact
from lorakit.trainer import EarlyStopper, LorakitTrainer

if TYPE_CHECKING:
    from lorakit.config import DataSpec, ModelSpec
    from lorakit.pipeline import Pipeline

__all__ = ["TrainResult", "resolve_grad_checkpointing", "run_training"]


@attrs.frozen
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run directory (adapter, tokenizer, config, metrics)."""
    metrics: dict[str, float]
    """``train_loss``, ``train_runtime`` (s), ``train_steps``, ``train_tokens`` (real, non-padding tokens trained
    on, all processes), ``train_computed_tokens`` (padding included), ``train_loss_tokens`` (tokens carrying
    loss), ``train_tokens_per_second``, and with a validation split ``eval_loss`` and ``eval_perplexity``."""
    data_report: dict[str, Any]
    """What data preparation kept, cut and dropped (see :class:`lorakit.data.DataReport`)."""

    def _repr_html_(self) -> str:
        """In a notebook: the run's summary (plan, curves, metrics) as in its ``report.html``."""
        return summary_html(self.output_dir)


def run_training(
    pipeline: Pipeline,
    output_dir: Path,
    *,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    resume: bool | str | Path = False,
) -> TrainResult:
    """Train holding the run directory's lock (one writer per run: a second train() into it fails at once);
    released when the run ends, also on errors. A full disk becomes a StorageError naming what was kept.
    Third-party notices lorakit has handled are silenced for this call only (lorakit.noise lists them)."""
    output_dir = output_dir.expanduser()
    with (
        RunLock.hold(output_dir, active=is_main_process()),
        storage_guard(output_dir),
        noise.quiet(progress_bars=live_output()),
    ):
        return _train_locked(pipeline, output_dir, overwrite=overwrite, callbacks=callbacks, resume=resume)


def _train_locked(
    pipeline: Pipeline,
    output_dir: Path,
    *,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    resume: bool | str | Path = False,
) -> TrainResult:
    run = _resolve(pipeline, output_dir, overwrite=overwrite, resume=resume)
    tokenizer, prepared = _prepare(run)
    run = _with_data(run, prepared)
    model = _load(run)
    console = _console(run, prepared)
    trainer, extras, tracker = _build_trainer(run, model, tokenizer, prepared, [console, *(callbacks or [])])
    try:
        metrics = _fit(run, trainer, extras)
    finally:
        tracker.close()
    if is_main_process():  # the run directory is written by the main process only
        _save(run, trainer, tokenizer, prepared, metrics, tracker)
        console.print(final_summary(metrics, run.output_dir, run.rundir.report_html_file))
    _release(run, trainer, model)
    return TrainResult(output_dir=run.output_dir, metrics=metrics, data_report=prepared.report.to_dict())


# --- 1. resolve -----------------------------------------------------------------------------------------


@attrs.frozen
class _Run:
    """What the phases share: the pipeline and every decision taken before loading anything."""

    pipeline: Pipeline
    model_spec: ModelSpec
    data_spec: DataSpec
    rundir: RunDir
    resume_from: Path | None
    precision: str
    device: str
    grad_ckpt: bool
    distributed_args: dict[str, Any]
    template: Any
    method: Any
    context: MethodContext
    has_val: bool = False
    meta: dict[str, Any] | None = None
    resumed: dict[str, Any] | None = None
    sizes: tuple[int, int, str | None] = (0, 0, None)
    """Trainable and total parameters, and the memory estimate, from the meta-device model."""
    save_bytes: tuple[int, int] = (0, 0)
    """Bytes of the final save and of one checkpoint (:func:`lorakit.plan.save_bytes`), for the space check."""
    optim: str = "adamw_torch_fused"
    """The optimizer ``with_training(optim=...)`` became (:func:`lorakit.plan.decide_optimizer`), recorded apart
    from the pipeline config (which keeps ``"auto"``)."""
    padding_free: bool = False
    """Batches are concatenated into one row (:func:`lorakit.plan.decide_padding_free`)."""

    @property
    def output_dir(self) -> Path:
        return self.rundir.path


def _resolve(pipeline: Pipeline, output_dir: Path, *, overwrite: bool, resume: bool | str | Path) -> _Run:
    """Check everything that can be checked before loading the tokenizer, the data or the weights."""
    pipeline.require()
    assert pipeline.model is not None and pipeline.data is not None
    rundir = RunDir(output_dir)
    resume_from = find_resume_checkpoint(rundir.path, resume) if resume else None
    if resume_from is None:
        rundir.check(overwrite=overwrite)
    _check_environment(pipeline)
    config = load_model_config(pipeline.model)
    precision = resolve_precision(pipeline.training.precision, hidden_size=hidden_size_of(config))
    device = device_kind()
    _check_optimizer(pipeline.training.optim, device)
    preflight(pipeline, cuda=device == "cuda")
    distributed_args = training_arguments(pipeline)
    distributed_args.pop("gradient_checkpointing", None)  # decided below; SFTConfig must not get it twice
    grad_ckpt, note = resolve_grad_checkpointing(pipeline, device)
    if note:
        print(f"lorakit: {note}", flush=True)
    method = pipeline.resolved_method
    context = MethodContext(
        base_path=resolve_model_path(pipeline.model),
        revision=pipeline.model.revision,
        tokenizer_kwargs=_tokenizer_kwargs(pipeline.model),
        resuming=resume_from is not None,
    )
    method.check_run(context)  # what the method cannot do with this base fails before any load
    # Target modules that match nothing fail here, on the meta device, naming the modules that exist.
    meta_model, total = apply_method_on_meta(pipeline, config)
    trainable = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
    sized = with_optimizer(pipeline, current_device())  # optim="auto" made concrete; the config keeps "auto"
    memory = estimate_memory(
        sized, meta_model, config, precision=precision, device=device, grad_checkpointing=grad_ckpt
    )
    sizes = save_bytes(sized, meta_model, config, precision=precision, device=device)
    return _Run(
        pipeline=pipeline,
        model_spec=pipeline.model,
        data_spec=pipeline.data,
        rundir=rundir,
        resume_from=resume_from,
        precision=precision,
        device=device,
        grad_ckpt=grad_ckpt,
        distributed_args=distributed_args,
        template=get_template(pipeline.data.template),
        method=method,
        context=context,
        sizes=(trainable, total, format_bytes(memory.total)),
        save_bytes=sizes,
        optim=sized.training.optim,
        padding_free=_padding_free(pipeline),
    )


def _padding_free(pipeline: Pipeline) -> bool:
    """Whether SFT batches are concatenated into one row: :func:`lorakit.plan.decide_padding_free` for the
    attention the model loads with."""
    assert pipeline.model is not None and pipeline.data is not None
    attention, _ = decide_attention(pipeline.model.attention, current_device())
    on, _ = decide_padding_free(
        pipeline.training.padding_free,
        packing=pipeline.data.packing,
        attention=attention,
        preference=pipeline.preference is not None,
    )
    return on


def _check_environment(pipeline: Pipeline) -> None:
    """Collect every missing package / unsupported request and raise them together, before any load."""
    from importlib.util import find_spec

    problems: list[str] = []
    if pipeline.quant is not None and find_spec("bitsandbytes") is None:
        problems.append(f"{pipeline.quant.method_name} needs bitsandbytes: pip install 'lorakit[qlora]'")
    backend = pipeline.tracking.backend
    if backend == "wandb" and find_spec("wandb") is None:
        problems.append("track('wandb') needs wandb: pip install 'lorakit[wandb]'")
    if "mlflow" in backend.split("+") and find_spec("mlflow") is None:
        problems.append("track('mlflow') needs mlflow: pip install 'lorakit[mlflow]'")
    if backend == "tensorboard" and find_spec("tensorboard") is None:
        problems.append("track('tensorboard') needs tensorboard: pip install 'lorakit[tensorboard]'")
    if pipeline.evaluation is not None:
        problems.extend(missing_packages(pipeline.evaluation.metrics))
    if problems:
        raise MissingDependencyError("Cannot start training:\n  - " + "\n  - ".join(problems))


def _check_optimizer(optim: str, device: str) -> None:
    if optim.startswith("paged_") and device != "cuda":
        raise ConfigError(
            f"with_training(optim={optim!r}) pages optimizer state between GPU and CPU memory and "
            f"needs a CUDA GPU; this run is on {device}. Use optim='adamw_torch' (or 'adamw_8bit')."
        )


def resolve_grad_checkpointing(pipeline: Pipeline, device: str) -> tuple[bool, str | None]:
    """The Trainer's ``gradient_checkpointing`` argument, and a note when lorakit turned it off: the decision
    of :func:`lorakit.plan.decide_grad_checkpointing` (FSDP's own activation checkpointing leaves the
    Trainer's off)."""
    decision = decide_grad_checkpointing(
        pipeline.training, pipeline.resolved_method, device, pipeline.distribution
    )
    return decision.trainer, decision.note


def _tokenizer_kwargs(spec: Any) -> dict[str, Any]:
    """What PEFT passes to ``AutoTokenizer.from_pretrained`` to embed a prompt-tuning ``init_text``.

    PEFT drops ``trust_remote_code`` (a loaded checkpoint must not run code), so only the revision is passed.
    """
    return {"revision": spec.revision} if spec.revision is not None else {}


# --- 2. data --------------------------------------------------------------------------------------------


def _prepare(run: _Run) -> tuple[Any, Any]:
    """The tokenizer and the tokenized rows; fatal data problems stop here, before any weights load."""
    tokenizer = load_tokenizer(run.context.base_path, run.model_spec)
    prepared = _prepare_rows(run, tokenizer)
    report = prepared.report
    print("lorakit data: " + report.summary().replace("\n", "\n              "), flush=True)
    # The audit: fatal problems (nothing trained, end-of-turn never trained) stop here.
    report.raise_if_fatal()
    _, problems = report.problems()
    if problems:
        warnings.warn(
            "Data preparation: " + " ".join(problems) + f" See the data report in {RUN_FILE}.",
            stacklevel=4,
        )
    return tokenizer, prepared


def _prepare_rows(run: _Run, tokenizer: Any) -> Any:
    """SFT rows (:func:`lorakit.data.prepare_data`), or with a preference objective its rows
    (:func:`lorakit.data.preference.prepare_preference_data`), rendered by the same template code."""
    spec, options = run.data_spec, run.data_spec.prepare_kwargs()
    preference = run.pipeline.preference
    if preference is None and spec.streaming:
        return _prepare_stream(run, tokenizer)
    if preference is None:
        return prepare_data(spec.source, tokenizer=tokenizer, template=run.template, **options)
    return prepare_preference_data(
        spec.source,
        tokenizer=tokenizer,
        template=run.template,
        paired=preference.info.paired,
        **{
            name: options[name]
            for name in ("max_length", "val_split", "seed", "val_source", "columns", "on_bad_row")
        },
    )


def _prepare_stream(run: _Run, tokenizer: Any) -> StreamedData:
    """A streamed SFT dataset: rows encoded as the trainer draws them (:mod:`lorakit.data.stream`); the first
    step's examples are read now for the audit."""
    train_spec, spec = run.pipeline.training, run.data_spec
    consumed, held_out = stream_rows(train_spec, spec)
    return prepare_stream(
        spec.source,
        tokenizer=tokenizer,
        template=run.template,
        val_rows=held_out,
        planned_rows=consumed,
        probe_examples=train_spec.batch_size * train_spec.grad_accum,
        **spec.prepare_kwargs(),
    )


def _with_data(run: _Run, prepared: Any) -> _Run:
    """The decisions that need the tokenized rows: the step count, resume checks, evaluation settings."""
    pipeline, train_spec = run.pipeline, run.pipeline.training
    # Counted from the tokenized rows the way the Trainer counts them (a method's schedule may need it).
    _, total_steps = steps_for(
        prepared.planned_rows if isinstance(prepared, StreamedData) else len(prepared.train),
        batch_size=train_spec.batch_size,
        grad_accum=train_spec.grad_accum,
        epochs=train_spec.epochs,
        max_steps=train_spec.max_steps,
        world_size=max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1),
    )
    run.method.check_steps(total_steps)  # a schedule that cannot fit fails here, before the weights load
    _check_storage(run, total_steps)
    has_val = prepared.val is not None and len(prepared.val) > 0
    # Resuming continues the same run only: config and tokenized data must equal the checkpoint's.
    checkpointing = pipeline.checkpoints is not None or train_spec.save_steps is not None
    meta = ckpt.resume_meta(pipeline, prepared.train) if checkpointing or run.resume_from else None
    resumed = ckpt.check_resume(run.resume_from, meta) if run.resume_from and meta is not None else None
    check_specs(pipeline, has_val=has_val)
    context = attrs.evolve(run.context, total_steps=total_steps)
    return attrs.evolve(run, context=context, has_val=has_val, meta=meta, resumed=resumed)


def _check_storage(run: _Run, total_steps: int) -> None:
    """Enough free space for the final save and the checkpoints kept at once (plus one being written)."""
    train_spec, checkpoints = run.pipeline.training, run.pipeline.checkpoints
    every = checkpoints.every if checkpoints is not None else train_spec.save_steps
    saves = math.ceil(total_steps / every) if every else 0
    keep = checkpoints.keep if checkpoints is not None else None
    kept = min(saves, keep + 2) if keep else saves  # lorakit keeps the best and the latest; one being written
    final, checkpoint = run.save_bytes
    needed = int(1.1 * (final + kept * checkpoint)) + (1 << 20)
    check_free_space(run.output_dir, needed, f"the adapter and {kept} checkpoint(s) of this run")


# --- 3. load --------------------------------------------------------------------------------------------


def _load(run: _Run) -> Any:
    """The base model (optionally quantized), prepared for k-bit training and by the method."""
    from peft import prepare_model_for_kbit_training
    from transformers import set_seed

    pipeline = run.pipeline
    set_seed(pipeline.training.seed)
    model = load_base_model(
        run.context.base_path,
        run.model_spec,
        # On CPU, bf16 is autocast over fp32 weights (the Trainer's bf16=True); GPUs load the weights in it.
        dtype=torch_dtype(run.precision if run.device == "cuda" else "fp32"),
        quant=pipeline.quant,
        quant_storage=quantization_storage(pipeline),
    )
    if pipeline.quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.grad_ckpt)
    return _start_adapter(run, run.method.prepare_model(model))


def _start_adapter(run: _Run, model: Any) -> Any:
    """With ``Pipeline.from_run``: the earlier run's adapter on the base, trainable (it keeps training)."""
    start = run.pipeline.start
    if start is None or not start.adapter:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, start.path, is_trainable=True)


# --- 4. trainer -----------------------------------------------------------------------------------------


def _warmup_steps(warmup_ratio: float) -> float:
    """``TrainingArguments.warmup_steps`` for ``with_training(warmup_ratio=)``.

    Deliberate: transformers 5 takes a float below 1 in ``warmup_steps`` as a fraction of the run's steps
    (``get_warmup_steps``: ``ceil(total * ratio)``), and ``warmup_ratio`` is deprecated there. lorakit's ratio
    is validated to ``[0, 1)``, so it is always read as a fraction.
    """
    assert 0.0 <= warmup_ratio < 1.0, warmup_ratio
    return float(warmup_ratio)


def _objective_config(run: _Run) -> tuple[Any, dict[str, Any]]:
    """The TRL config class of the run's objective and its own arguments (SFT: lorakit's tokenized rows)."""
    import importlib

    preference = run.pipeline.preference
    if preference is None:
        from trl import SFTConfig

        return SFTConfig, {"dataset_kwargs": {"skip_prepare_dataset": True}}
    module, name = preference.info.config.rsplit(".", 1)
    return getattr(importlib.import_module(module), name), preference.config_kwargs()


def _training_args(run: _Run) -> Any:
    """The SFTConfig: optimisation settings, then evaluation / checkpoint / best-model settings."""
    train_spec, data_spec, device = run.pipeline.training, run.data_spec, run.device
    config_class, objective_args = _objective_config(run)
    args = config_class(
        output_dir=str(run.rundir.checkpoints_dir),
        use_cpu=device == "cpu",
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        gradient_checkpointing=run.grad_ckpt,
        num_train_epochs=train_spec.epochs,
        max_steps=train_spec.max_steps if train_spec.max_steps is not None else -1,
        learning_rate=train_spec.lr,
        per_device_train_batch_size=train_spec.batch_size,
        per_device_eval_batch_size=train_spec.batch_size,
        gradient_accumulation_steps=train_spec.grad_accum,
        lr_scheduler_type=train_spec.scheduler,
        optim=run.optim,
        warmup_steps=_warmup_steps(train_spec.warmup_ratio),
        weight_decay=train_spec.weight_decay,
        seed=train_spec.seed,
        data_seed=train_spec.seed,
        logging_steps=train_spec.logging_steps,
        eval_strategy=("steps" if train_spec.eval_steps else "epoch") if run.has_val else "no",
        eval_steps=train_spec.eval_steps,
        save_strategy="steps" if train_spec.save_steps else "no",
        save_steps=train_spec.save_steps or 500,
        report_to="none",
        max_length=data_spec.max_length,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=not progress_enabled(),
        **objective_args,
        **run.distributed_args,
    )
    # Creating the arguments joined the process group of a distributed launch; refuse unsynchronised copies.
    check_launch(args)
    return trainer_arguments(args, run.pipeline, has_val=run.has_val)


def _speed_paths(run: _Run, trainer: LorakitTrainer) -> None:
    """The fused loss (where it applies), bool dropout masks and bf16 frozen weights on a CPU, and
    ``torch.compile`` of the decoder layers (see lorakit.fused)."""
    train_spec, device = run.pipeline.training, run.device
    if isinstance(trainer, LorakitTrainer):  # SFT; a preference objective computes its own loss
        trainer.use_fused_loss(train_spec.fused_loss)
    if device == "cpu":  # a GPU's fused dropout kernel is faster than drawing integers
        use_mask_dropout(trainer.model)
    if decide_frozen_bf16(run.pipeline, run.precision, device):
        store_frozen_bf16(trainer.model)
    if train_spec.compile is True or (train_spec.compile == "auto" and device == "cuda"):
        compile_blocks(trainer.model)


def _prepare_run_dir(run: _Run) -> None:
    """A fresh run removes the previous run's outputs; a resumed one what the crash left half-written."""
    if not is_main_process():  # only after every process has checked the (still untouched) directory
        return
    run.output_dir.mkdir(parents=True, exist_ok=True)
    if run.resume_from is None:
        run.rundir.clear_for_fresh_run()
    else:
        run.rundir.prepare_resume(run.resume_from)


def _build_trainer(
    run: _Run, model: Any, tokenizer: Any, prepared: Any, callbacks: list[Any]
) -> tuple[LorakitTrainer, TrainingExtras, Tracker]:
    from transformers import set_seed

    pipeline, data_spec = run.pipeline, run.data_spec
    args = _training_args(run)
    _prepare_run_dir(run)
    tracker = Tracker(pipeline, run.output_dir, active=is_main_process())
    val = prepared.val if run.has_val else None
    extras = TrainingExtras(pipeline, val, tokenizer, run.template, tracker)
    if run.resumed is not None and extras.stopper is not None:
        extras.stopper.load(run.resumed.get("early_stop"))
    set_seed(pipeline.training.seed)
    trainer_class, trainer_kwargs = _trainer_class(run, tokenizer)
    trainer = trainer_class(
        model=model,
        args=args,
        **trainer_kwargs,
        train_dataset=prepared.train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=run.method.peft_config(run.context) if _new_adapter(run) else None,
        callbacks=[
            *run.method.callbacks(),
            MetricsLog(run.rundir),
            *tracker.callbacks,
            *extras.callbacks,
            *callbacks,
        ],
        method=run.method,
        evaluator=extras.evaluator,
        early_stop=extras.stopper,
        resume_meta=run.meta,
        keep=extras.keep,
    )
    remove_default_printers(trainer)  # lorakit's console (in `callbacks`) shows progress; no raw log dicts
    _speed_paths(run, trainer)
    streamed = isinstance(prepared, StreamedData)
    if streamed:
        prepared.stream.start()  # built: from now on the stream is read (in order, not length-grouped)
    if (
        pipeline.training.group_by_length
        and not (data_spec.packing or streamed)
        and pipeline.preference is None
    ):
        # Similar lengths in a batch: dynamic padding then computes few pad tokens (see docs/benchmarks.md).
        trainer.group_by_length([len(ids) for ids in prepared.train["input_ids"]])
    if pipeline.quant is not None and run.precision != "bf16":
        # TRL casts the adapter of a quantized model to bf16; on an fp32 run keep it (and the saved file) fp32,
        # and on an fp16 run too (the gradient scaler needs fp32 master weights; bf16 would be emulated on a T4).
        adapted: Any = trainer.model
        for param in adapted.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    run.method.setup_trainer(trainer, run.context)
    return trainer, extras, tracker


def _console(run: _Run, prepared: Any) -> TrainingConsole:
    """The run's progress display; prints the plan summary (main process only)."""
    train = run.pipeline.training
    console = TrainingConsole(run.context.total_steps or 1)
    if is_main_process():
        trainable, total, memory = run.sizes
        report = prepared.report
        console.print(
            plan_summary(
                run.output_dir,
                model=run.model_spec.name_or_path,
                method=run.method.describe(),
                trainable=trainable,
                total=total,
                rows=(
                    prepared.planned_rows if isinstance(prepared, StreamedData) else report.train_rows,
                    report.val_rows,
                ),
                steps=run.context.total_steps or 0,
                batch=(train.batch_size, train.grad_accum),
                precision=run.precision,
                device=run.device,
                memory=memory,
            )
        )
    return console


def _trainer_class(run: _Run, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The trainer class of the run's objective and its data arguments: SFT pads lorakit's rows with lorakit's
    collators; a preference trainer uses TRL's own collator on lorakit's tokenized rows."""
    preference = run.pipeline.preference
    if preference is not None:
        return getattr(trainers, preference.info.trainer), {}
    collator_class = PaddingFreeCollator if run.padding_free else PadCollator
    return LorakitTrainer, {"data_collator": collator_class(pad_token_id=tokenizer.pad_token_id)}


def _new_adapter(run: _Run) -> bool:
    """False when the model already carries the adapter that trains (``Pipeline.from_run``)."""
    start = run.pipeline.start
    return start is None or not start.adapter


class MetricsLog(TrainerCallback):
    """Append every log event to the run directory's metrics log (always on, whatever the tracker)."""

    def __init__(self, rundir: RunDir) -> None:
        self.rundir = rundir

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.rundir.log_metrics(state.global_step, logs)


# --- 5. fit ---------------------------------------------------------------------------------------------


def _fit(run: _Run, trainer: LorakitTrainer, extras: TrainingExtras) -> dict[str, float]:
    """Train (from the checkpoint when resuming), then the final evaluation; the run's metrics."""
    started = time.perf_counter()
    output = trainer.train(
        resume_from_checkpoint=str(run.resume_from) if run.resume_from is not None else None
    )
    runtime = time.perf_counter() - started
    counted = trainer.token_totals()
    metrics: dict[str, float] = {
        "train_loss": float(output.training_loss),
        "train_steps": int(output.global_step),
        "train_runtime": round(runtime, 3),
        "train_tokens": counted["tokens"],
        "train_computed_tokens": counted["computed_tokens"],
        "train_loss_tokens": counted["loss_tokens"],
        "train_tokens_per_second": round(counted["tokens"] / runtime, 2) if runtime > 0 else 0.0,
    }
    metrics.update(extras.summary(trainer))
    if run.has_val:
        eval_metrics = trainer.final_evaluation()
        metrics["eval_loss"] = float(eval_metrics["eval_loss"])
        if run.pipeline.preference is None:  # a preference loss is not a language-model loss
            metrics["eval_perplexity"] = float(math.exp(min(eval_metrics["eval_loss"], 50.0)))
        metrics.update(extras.final_metrics(eval_metrics))
    return metrics


# --- 6. save --------------------------------------------------------------------------------------------


def _save(
    run: _Run,
    trainer: Any,
    tokenizer: Any,
    prepared: Any,
    metrics: dict[str, float],
    tracker: Tracker,
) -> None:
    """The adapter (or model), tokenizer, run record, metrics, provenance and report."""
    pipeline, output_dir = run.pipeline, run.output_dir
    # TRL's frozen reference copy of a starting adapter is not part of the result.
    frozen_ref = REFERENCE_ADAPTER in (getattr(trainer.model, "peft_config", None) or {})
    with run.method.saving(trainer.model, checkpoint=False):
        trainer.model.save_pretrained(
            str(output_dir), **({"selected_adapters": ["default"]} if frozen_ref else {})
        )
    tokenizer.save_pretrained(str(output_dir))
    config = pipeline.to_config()
    config["data"]["source"] = redact(run.rundir.source_for_config(run.data_spec.source))
    record = {
        "pipeline": config,
        "base_model_path": run.context.base_path,
        "template": run.template.to_dict(),
        "precision": run.precision,
        "optimizer": run.optim,  # what with_training(optim=...) became; the pipeline config keeps "auto"
        "padding_free": run.padding_free,
        "data_report": prepared.report.to_dict(),
        "versions": _versions(),
        "report_data": report_data(
            prepared.sample() if isinstance(prepared, StreamedData) else prepared,
            tokenizer,
            run.data_spec.max_length,
        ),
    }
    record["checksums"] = checksums(output_dir)  # checked when the run loads
    if pipeline.start is not None:  # Pipeline.from_run: the run this one continued
        record["parent_run"] = pipeline.start.path
    run.rundir.write_run(record)
    run.rundir.write_metrics(metrics)
    run.rundir.write_provenance(
        pipeline.model,
        run.context.base_path,
        parent=pipeline.start.path if pipeline.start is not None else None,
    )
    write_run_report(
        output_dir,
        pipeline=pipeline,
        metrics=metrics,
        data_report=prepared.report.to_dict(),
        trackers=tracker.describe(),
    )
    write_run_card(output_dir, run.template, tokenizer)
    tracker.log_artifacts(output_dir)  # MLflow: the report, the adapter and its card
    run.rundir.drop_replaced()  # overwrite=True: the new run is complete, the old one goes


def _release(run: _Run, trainer: Any, model: Any) -> None:
    del trainer, model
    if run.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"lorakit": __version__}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- evaluation, checkpoint and early-stopping settings -------------------------------------------------

_BUILTIN_KEYS = {
    "perplexity": ("perplexity",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "chrf": ("chrf",),
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy", "accuracy_unmatched"),
}
_TRAINER_EVAL_KEYS = ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens")
_BOOKKEEPING = ("runtime", "per_second", "num_tokens", "entropy", "epoch")


def known_eval_keys(pipeline: Any) -> set[str] | None:
    """The ``eval_*`` keys an evaluation will produce, or None when a custom metric makes them unknowable."""
    if pipeline.preference is not None:
        return eval_keys(pipeline.preference)
    keys = set(_TRAINER_EVAL_KEYS)
    specs = pipeline.evaluation.metrics if pipeline.evaluation is not None else ()
    for spec in specs:
        if not isinstance(spec, str) or spec not in _BUILTIN_KEYS:
            return None
        keys.update(f"eval_{key}" for key in _BUILTIN_KEYS[spec])
    return keys


def check_specs(pipeline: Any, *, has_val: bool) -> None:
    """Evaluation / checkpoint / early-stopping settings that cannot work with this data: raised before any
    weights load."""
    evaluation, checkpoints, early = pipeline.evaluation, pipeline.checkpoints, pipeline.early_stop
    if not has_val:
        for name, spec in (("with_eval()", evaluation), ("early_stopping()", early)):
            if spec is not None:
                raise ConfigError(
                    f"{name} needs a validation split, but this run has none. Set with_dataset(val_split=0.1) "
                    "or with_dataset(val=...)."
                )
        return
    if checkpoints is not None and checkpoints.best_metric is not None:
        eval_every = _eval_every(pipeline)
        if checkpoints.every % eval_every:
            raise ConfigError(
                f"with_checkpoints(every={checkpoints.every}) must be a multiple of the evaluation interval "
                f"({eval_every} steps) so each checkpoint has a {checkpoints.best_metric!r} to compare. "
                "Change one of the two."
            )
    known = known_eval_keys(pipeline)
    watched = [("early_stopping(metric=...)", early.metric if early else None)]
    if checkpoints is not None:
        watched.append(("with_checkpoints(best_metric=...)", checkpoints.best_metric))
    for call, metric in watched:
        if metric is not None and known is not None and eval_key(metric) not in known:
            raise ConfigError(
                f"{call}: {metric!r} is not among the evaluation results {sorted(known)}. Pick one of those, "
                "or add its metric to with_eval(metrics=...)."
            )


def _eval_every(pipeline: Any) -> int:
    """Steps between evaluations when checkpoints pick the best: with_eval(every=), else eval_steps, else the
    checkpoint interval."""
    evaluation = pipeline.evaluation
    if evaluation is not None and evaluation.every:
        return int(evaluation.every)
    return int(pipeline.training.eval_steps or pipeline.checkpoints.every)


def trainer_arguments(args: Any, pipeline: Any, *, has_val: bool) -> Any:
    """The SFTConfig with evaluation / checkpoint / best-model settings from the pipeline's specs."""
    check_specs(pipeline, has_val=has_val)
    evaluation, checkpoints, early = pipeline.evaluation, pipeline.checkpoints, pipeline.early_stop
    changes: dict[str, Any] = {}
    if has_val and evaluation is not None and evaluation.every:
        changes.update(eval_strategy="steps", eval_steps=evaluation.every)
    if checkpoints is not None:
        # No save_total_limit here: lorakit rotates (the trainer's own rotation would, with a limit of 1,
        # delete the latest checkpoint at the end of training; lorakit keeps the best and the latest).
        changes.update(save_strategy="steps", save_steps=checkpoints.every, save_total_limit=None)
        if has_val and checkpoints.best_metric is not None:
            key = eval_key(checkpoints.best_metric)
            lowered = key.lower()
            changes.update(
                eval_strategy="steps",
                eval_steps=_eval_every(pipeline),
                metric_for_best_model=key,
                greater_is_better=not ("loss" in lowered or "perplexity" in lowered),
                load_best_model_at_end=checkpoints.load_best,
            )
    if (
        early is not None
        and "eval_strategy" not in changes
        and getattr(args.eval_strategy, "value", args.eval_strategy) == "no"
    ):
        changes.update(eval_strategy="epoch")
    if not changes:
        return args
    with warnings.catch_warnings():  # re-passing every field repeats transformers' deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        return dataclasses.replace(args, **changes)


class TrainingExtras:
    """Evaluation numbers, generation samples and early stopping for one ``train()`` call."""

    def __init__(self, pipeline: Any, val: Any, tokenizer: Any, template: Any, tracker: Any) -> None:
        self.callbacks: list[Any] = []
        self.stopper = EarlyStopper(pipeline.early_stop) if pipeline.early_stop is not None else None
        self.keep = pipeline.checkpoints.keep if pipeline.checkpoints is not None else None
        self.evaluator = _evaluator(pipeline.evaluation, val, tokenizer, template)
        if pipeline.samples is not None:
            prompts, shown = sample_prompts(pipeline.samples, val, tokenizer, template)
            if prompts:
                self.callbacks.append(
                    sample_callback(pipeline.samples, prompts, shown, tokenizer, template, tracker)
                )
            else:
                warnings.warn(
                    "log_samples(): no prompts given and no validation rows to take them from; no samples are "
                    "logged. Pass log_samples(prompts=[...]).",
                    stacklevel=5,
                )

    def summary(self, trainer: Any) -> dict[str, float]:
        """Early stopping and best-checkpoint numbers for the run's final metrics."""
        out: dict[str, float] = {}
        if self.stopper is not None and self.stopper.stopped_step is not None:
            out["early_stopped_at_step"] = self.stopper.stopped_step
        state = trainer.state
        if state.best_model_checkpoint and state.best_metric is not None:
            out["best_step"] = checkpoint_step(state.best_model_checkpoint)
            out[f"best_{trainer.args.metric_for_best_model}"] = float(state.best_metric)
        return out

    @staticmethod
    def final_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
        """The quality numbers of the final evaluation (no timings)."""
        return {
            key: float(value)
            for key, value in eval_metrics.items()
            if key.startswith("eval_")
            and isinstance(value, (int, float))
            and not any(word in key for word in _BOOKKEEPING)
        }


def _evaluator(spec: Any, val: Any, tokenizer: Any, template: Any) -> TrainingEvaluator | None:
    """lorakit's evaluation numbers during training (``with_eval``), or None."""
    if spec is None:
        return None
    generation_set = None
    if val is not None and any(get_metric(m).needs == "text" for m in spec.metrics):
        generation_set = GenerationSet.from_dataset(
            val, n=spec.samples, tokenizer=tokenizer, template=template
        )
        if not generation_set.prompts:
            warnings.warn(
                "with_eval(): no validation row has an untrained prompt to generate from (raw text, or "
                "train_on_inputs=True), so the text metrics are skipped.",
                stacklevel=6,
            )
    return TrainingEvaluator(spec, generation_set, tokenizer, template)

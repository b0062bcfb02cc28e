"""``Pipeline.train()``: check -> load -> prepare data -> SFTTrainer -> save, top to bottom."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit import __version__
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.run import METRICS_FILE, METRICS_LOG, RUN_FILE, check_output_dir, write_json_atomic

if TYPE_CHECKING:
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


def _check_environment(pipeline: Pipeline) -> None:
    """Collect every missing package / unsupported request and raise them together, before any load."""
    from importlib.util import find_spec

    problems: list[str] = []
    if pipeline.quant is not None and find_spec("bitsandbytes") is None:
        problems.append(f"{pipeline.quant.method_name} needs bitsandbytes: pip install 'lorakit[qlora]'")
    backend = pipeline.tracking.backend
    if backend == "wandb" and find_spec("wandb") is None:
        problems.append("track('wandb') needs wandb: pip install 'lorakit[wandb]'")
    if backend == "tensorboard" and find_spec("tensorboard") is None:
        problems.append("track('tensorboard') needs tensorboard: pip install 'lorakit[tensorboard]'")
    if pipeline.evaluation is not None:
        from lorakit.metrics.builtin import missing_packages

        problems.extend(missing_packages(pipeline.evaluation.metrics))
    if problems:
        raise MissingDependencyError("Cannot start training:\n  - " + "\n  - ".join(problems))


def resolve_grad_checkpointing(
    pipeline: Pipeline, device: str, distributed: bool | None = None
) -> tuple[bool, str | None]:
    """Whether the run uses gradient checkpointing, and a note when lorakit turned it off.

    ``grad_checkpointing=None`` means on for CUDA, off elsewhere (``distributed`` overrides that when the
    distributed set-up decides, e.g. FSDP's own activation checkpointing). Prefix methods cannot train with it
    (an explicit ``True`` was refused at the builder call), so an automatic one is turned off for them.
    """
    from lorakit.methods import supports_grad_checkpointing

    requested = pipeline.training.grad_checkpointing
    grad_ckpt = requested if requested is not None else device == "cuda"
    if distributed is not None:
        grad_ckpt = distributed
    method = pipeline.resolved_method
    if grad_ckpt and not supports_grad_checkpointing(method):
        return False, (
            f"gradient checkpointing off: {method.name} cannot train with it (PEFT's prefix key/values and the "
            "recomputed forward disagree on sequence lengths); see docs/methods.md."
        )
    return grad_ckpt, None


def _metrics_log_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Append every log event to ``metrics.jsonl`` (always on, whatever the tracker)."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            with path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsLog()


def _with_orth_regularization(base: type) -> type:
    """``base`` with AdaLoRA's orthogonality penalty added to the training loss.

    PEFT adds it to ``outputs.loss`` in ``AdaLoraModel.forward``, but SFTTrainer computes the loss from the
    per-token log-probabilities and never reads ``outputs.loss``, so the penalty would be lost.
    """
    from lorakit.methods.adalora import orth_regularization

    class AdaLoraTrainer(base):  # type: ignore[misc, valid-type]
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return result
            penalty = orth_regularization(self.accelerator.unwrap_model(model))
            if penalty is None:
                return result
            # With num_items_in_batch the loss of a micro-batch is a share of the accumulated step's loss.
            if num_items_in_batch is not None:
                penalty = penalty / self.current_gradient_accumulation_steps
            if return_outputs:
                loss, outputs = result
                return loss + penalty, outputs
            return result + penalty

    return AdaLoraTrainer


def _source_for_config(source: Any, output_dir: Path) -> str:
    """A path that reloads the training rows: the file itself, or a copy of in-memory rows in the run."""
    if isinstance(source, str):
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source  # a Hub dataset id stays an id
    rows = source if isinstance(source, list) else source.to_list()
    path = output_dir / "data" / "source.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _tokenizer_kwargs(spec: Any) -> dict[str, Any]:
    """What PEFT passes to ``AutoTokenizer.from_pretrained`` to embed a prompt-tuning ``init_text``.

    PEFT drops ``trust_remote_code`` (a loaded checkpoint must not run code), so only the revision is passed.
    """
    return {"revision": spec.revision} if spec.revision is not None else {}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"lorakit": __version__}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_training(
    pipeline: Pipeline,
    output_dir: Path,
    *,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    resume: bool | str | Path = False,
) -> TrainResult:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from lorakit import checkpoints as ckpt
    from lorakit.batching import lorakit_trainer
    from lorakit.collate import PadCollator, PaddingFreeCollator
    from lorakit.data import prepare_data
    from lorakit.distributed import (
        check_launch,
        is_main_process,
        preflight,
        quantization_storage,
        training_arguments,
    )
    from lorakit.methods import peft_config_for
    from lorakit.methods.adalora import AdaLoraSpec, rank_allocation_callback
    from lorakit.methods.full import FullSpec, apply_freeze
    from lorakit.methods.lora import LoraSpec, apply_loftq, loftq_weights_dir
    from lorakit.models import (
        device_kind,
        load_base_model,
        load_model_config,
        load_tokenizer,
        resolve_model_path,
        resolve_precision,
        torch_dtype,
    )
    from lorakit.plan import apply_method_on_meta, steps_for
    from lorakit.provenance import write_provenance
    from lorakit.templates import get_template

    # 1. Check everything that can be checked before loading weights.
    pipeline.require()
    assert pipeline.model is not None and pipeline.data is not None
    output_dir = output_dir.expanduser()
    resume_from = ckpt.find_resume_checkpoint(output_dir, resume) if resume else None
    if resume_from is None:
        check_output_dir(output_dir, overwrite=overwrite)
    _check_environment(pipeline)
    train_spec, data_spec = pipeline.training, pipeline.data
    precision = resolve_precision(train_spec.precision)
    device = device_kind()
    if train_spec.optim.startswith("paged_") and device != "cuda":
        raise ConfigError(
            f"with_training(optim={train_spec.optim!r}) pages optimizer state between GPU and CPU memory and "
            f"needs a CUDA GPU; this run is on {device}. Use optim='adamw_torch' (or 'adamw_8bit')."
        )
    preflight(pipeline, cuda=device == "cuda")
    distributed_args = training_arguments(pipeline)
    grad_ckpt, note = resolve_grad_checkpointing(
        pipeline, device, distributed_args.pop("gradient_checkpointing", None)
    )
    if note:
        print(f"lorakit: {note}", flush=True)
    template = get_template(data_spec.template)
    base_path = resolve_model_path(pipeline.model)
    method = pipeline.resolved_method
    # LoftQ reads the full-precision weights from safetensors: refuse a base without them before any load.
    loftq = isinstance(method, LoraSpec) and method.init == "loftq"
    loftq_dir = loftq_weights_dir(base_path, pipeline.model.revision) if loftq else None
    # Target modules that match nothing fail here, on the meta device, naming the modules that exist.
    apply_method_on_meta(pipeline, load_model_config(pipeline.model))

    # 2. Tokenizer and data: data errors surface before the (slow) weight load.
    tokenizer = load_tokenizer(base_path, pipeline.model)
    prepared = prepare_data(
        data_spec.source, tokenizer=tokenizer, template=template, **data_spec.prepare_kwargs()
    )

    print("lorakit data: " + prepared.report.summary().replace("\n", "\n              "), flush=True)
    report = prepared.report
    # The audit: fatal problems (nothing trained, end-of-turn never trained) stop here, before any weights load.
    report.raise_if_fatal()
    _, problems = report.problems()
    if problems:
        warnings.warn(
            "Data preparation: " + " ".join(problems) + " See the data report in lorakit_run.json.",
            stacklevel=3,
        )
    # The method's PEFT config (None: full fine-tuning). AdaLoRA's schedule needs the run's step count, counted
    # from the tokenized rows the way the Trainer counts it; a schedule that does not fit fails here.
    if isinstance(method, AdaLoraSpec):
        _, total_steps = steps_for(
            len(prepared.train),
            batch_size=train_spec.batch_size,
            grad_accum=train_spec.grad_accum,
            epochs=train_spec.epochs,
            max_steps=train_spec.max_steps,
            world_size=max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1),
        )
        peft_config = method.to_peft_config(total_step=total_steps)
    else:
        peft_config = peft_config_for(method, base_path, _tokenizer_kwargs(pipeline.model))
    collator_class = PaddingFreeCollator if data_spec.packing else PadCollator
    collator = collator_class(pad_token_id=tokenizer.pad_token_id)
    # Resuming continues the same run only: config and tokenized data must equal the checkpoint's.
    checkpointing = pipeline.checkpoints is not None or train_spec.save_steps is not None
    meta = ckpt.resume_meta(pipeline, prepared.train) if checkpointing or resume_from else None
    resumed = ckpt.check_resume(resume_from, meta) if resume_from is not None and meta is not None else None
    ckpt.check_specs(pipeline, has_val=prepared.val is not None and len(prepared.val) > 0)

    # 3. Base model (optionally quantized), prepared for k-bit training.
    set_seed(train_spec.seed)
    model = load_base_model(
        base_path,
        pipeline.model,
        # On CPU, bf16 is autocast over fp32 weights (the Trainer's bf16=True); GPUs load the weights in it.
        dtype=torch_dtype(precision if device == "cuda" else "fp32"),
        quant=pipeline.quant,
        quant_storage=quantization_storage(pipeline),
    )
    if pipeline.quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    if isinstance(method, FullSpec):  # no adapter: the model's own weights train, all or the unfrozen part
        apply_freeze(model, method)

    # 4. TRL's SFTTrainer with our tokenized rows (labels already masked) and a pad-only collator.
    has_val = prepared.val is not None and len(prepared.val) > 0
    args = SFTConfig(
        output_dir=str(output_dir / "checkpoints"),
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=grad_ckpt,
        num_train_epochs=train_spec.epochs,
        max_steps=train_spec.max_steps if train_spec.max_steps is not None else -1,
        learning_rate=train_spec.lr,
        per_device_train_batch_size=train_spec.batch_size,
        per_device_eval_batch_size=train_spec.batch_size,
        gradient_accumulation_steps=train_spec.grad_accum,
        lr_scheduler_type=train_spec.scheduler,
        optim=train_spec.optim,
        warmup_steps=train_spec.warmup_ratio,
        weight_decay=train_spec.weight_decay,
        seed=train_spec.seed,
        data_seed=train_spec.seed,
        logging_steps=train_spec.logging_steps,
        eval_strategy=("steps" if train_spec.eval_steps else "epoch") if has_val else "no",
        eval_steps=train_spec.eval_steps,
        save_strategy="steps" if train_spec.save_steps else "no",
        save_steps=train_spec.save_steps or 500,
        report_to="none",
        max_length=data_spec.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=os.environ.get("LORAKIT_PROGRESS", "1") == "0",
        **distributed_args,
    )
    # Creating the arguments joined the process group of a distributed launch; refuse unsynchronised copies.
    check_launch(args)
    main = is_main_process()
    if main:  # only after every process has checked the (still untouched) directory
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            for stale in (METRICS_LOG, METRICS_FILE, RUN_FILE, *ckpt.RUN_OUTPUTS):
                (output_dir / stale).unlink(missing_ok=True)
            ckpt.remove_checkpoints(output_dir / ckpt.CHECKPOINTS_DIR)
        else:
            ckpt.prepare_resume(output_dir, resume_from)
    args = ckpt.trainer_arguments(args, pipeline, has_val=has_val)
    from lorakit.tracking import Tracker

    tracker = Tracker(pipeline, output_dir, active=main)
    tracker_callbacks, close_tracker = tracker.callbacks, tracker.close
    hooks = ckpt.training_hooks(pipeline, prepared.val if has_val else None, tokenizer, template, tracker)
    set_seed(train_spec.seed)
    trainer_class = ckpt.trainer_class(lorakit_trainer(SFTTrainer))
    method_callbacks: list[Any] = []
    if isinstance(method, AdaLoraSpec):
        trainer_class = _with_orth_regularization(trainer_class)
        method_callbacks.append(rank_allocation_callback())
    trainer = trainer_class(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=prepared.train,
        eval_dataset=prepared.val if has_val else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            *method_callbacks,
            _metrics_log_callback(output_dir / METRICS_LOG),
            *tracker_callbacks,
            *hooks.callbacks,
            *(callbacks or []),
        ],
    )
    if train_spec.group_by_length and not data_spec.packing:
        # Similar lengths in a batch: dynamic padding then computes few pad tokens (see docs/benchmarks.md).
        trainer.group_by_length([len(ids) for ids in prepared.train["input_ids"]])
    hooks.install(trainer, meta, resumed)
    if pipeline.quant is not None and precision == "fp32":
        # TRL casts the adapter of a quantized model to bf16; on an fp32 run keep it (and the saved file) fp32.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if loftq_dir is not None and resume_from is None:
        # LoftQ: A, B start as the rank-r fit of W - Q(W), W read from the safetensors (a resume loads them).
        apply_loftq(trainer.model, loftq_dir)

    # 5. Train, evaluate, save.
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
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
        metrics.update(hooks.summary(trainer))
        if has_val:
            eval_metrics = trainer.evaluate()
            metrics["eval_loss"] = float(eval_metrics["eval_loss"])
            metrics["eval_perplexity"] = float(math.exp(min(eval_metrics["eval_loss"], 50.0)))
            metrics.update(hooks.final_metrics(eval_metrics))
    finally:
        close_tracker()

    if not main:  # the run directory is written by the main process only
        del trainer, model
        return TrainResult(output_dir=output_dir, metrics=metrics, data_report=prepared.report.to_dict())
    with warnings.catch_warnings():
        # AdaLoRA layers whose whole rank budget moved elsewhere are saved with rank 0; PEFT takes zero-sized
        # tensors for unsharded ZeRO-3 / FSDP parameters and warns, wrongly here.
        if isinstance(method, AdaLoraSpec):
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        trainer.model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    config = pipeline.to_config()
    config["data"]["source"] = _source_for_config(data_spec.source, output_dir)
    write_json_atomic(
        output_dir / RUN_FILE,
        {
            "pipeline": config,
            "base_model_path": base_path,
            "template": template.to_dict(),
            "precision": precision,
            "data_report": prepared.report.to_dict(),
            "versions": _versions(),
        },
    )
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    write_provenance(output_dir, pipeline.model, base_path)
    from lorakit.tracking import write_run_report

    write_run_report(
        output_dir,
        pipeline=pipeline,
        metrics=metrics,
        data_report=report.to_dict(),
        trackers=tracker.describe(),
    )
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return TrainResult(output_dir=output_dir, metrics=metrics, data_report=prepared.report.to_dict())

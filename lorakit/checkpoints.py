"""Checkpoints that survive crashes, resume checks, early stopping and the NaN / inf loss guard.

Layout inside a run directory::

    <run>/checkpoints/checkpoint-<step>/      adapter, optimizer, scheduler, RNG states, trainer_state.json,
                                              lorakit_resume.json (config + data fingerprint)
    <run>/checkpoints/.partial/               a checkpoint being written; renamed into place when complete

A checkpoint is written into ``.partial/`` and renamed to ``checkpoint-<step>`` only when every file is there,
so a crash (even SIGKILL) in the middle of a save leaves the previous checkpoint complete and the newest
``checkpoint-*`` directory always usable for ``train(dir, resume=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from lorakit.config import eval_key
from lorakit.errors import ConfigError, TrainingError
from lorakit.run import write_json_atomic

__all__ = [
    "CHECKPOINTS_DIR",
    "RESUME_FILE",
    "EarlyStopper",
    "check_resume",
    "data_fingerprint",
    "find_resume_checkpoint",
    "list_checkpoints",
    "resume_meta",
    "trainer_arguments",
    "trainer_class",
]

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".partial"
RESUME_FILE = "lorakit_resume.json"
STATE_FILE = "trainer_state.json"
# Config sections that do not change what is trained; they may differ between a run and its resumption.
_FREE_SECTIONS = ("tracking", "evaluation", "samples", "checkpoints", "early_stop")
_FREE_DATA_FIELDS = ("source", "val", "cache", "num_proc")


# --- resume ---------------------------------------------------------------------------------------------


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 of the tokenized training rows: every column's values and row lengths, in order (independent
    of how Arrow chunks or types the integers)."""
    import numpy as np
    import pyarrow as pa

    digest = hashlib.sha256()
    columns = sorted(dataset.column_names)
    digest.update(json.dumps([columns, len(dataset)]).encode())
    table = dataset.with_format("arrow")[:]  # the rows as shown (a selected / shuffled view included)
    for column in columns:
        array = table.column(column).combine_chunks()
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            digest.update(np.asarray(array.value_lengths().fill_null(0), dtype=np.int64).tobytes())
            digest.update(
                np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes()
            )
        else:
            digest.update(json.dumps(array.to_pylist(), default=str).encode())
    return digest.hexdigest()


def comparable_config(pipeline: Any) -> dict[str, Any]:
    """The parts of the pipeline config that decide the training trajectory."""
    config = pipeline.to_config()
    for section in _FREE_SECTIONS:
        config.pop(section, None)
    if config.get("data"):
        for field in _FREE_DATA_FIELDS:
            config["data"].pop(field, None)  # the rows themselves are compared by fingerprint
    return json.loads(json.dumps(config, default=str))


def resume_meta(pipeline: Any, train_dataset: Any) -> dict[str, Any]:
    """What a checkpoint records so a resumption can check it continues the same run."""
    return {
        "config": comparable_config(pipeline),
        "data_fingerprint": data_fingerprint(train_dataset),
        "train_rows": len(train_dataset),
    }


def _step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.glob("checkpoint-*")
        if p.is_dir() and _step(p) >= 0 and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_step)


def find_resume_checkpoint(output_dir: Path, resume: bool | str | Path) -> Path:
    """The checkpoint to resume from: the latest in ``output_dir`` (``resume=True``) or the given one."""
    if resume is True:
        where = output_dir / CHECKPOINTS_DIR
    else:
        where = Path(str(resume)).expanduser()
        if (where / STATE_FILE).is_file():
            return where
        if (where / CHECKPOINTS_DIR).is_dir():
            where = where / CHECKPOINTS_DIR
        elif not where.is_dir():
            raise ConfigError(
                f"train(resume={str(resume)!r}): no such directory. Pass a checkpoint directory "
                "(…/checkpoints/checkpoint-<step>), a run directory, or resume=True."
            )
    found = list_checkpoints(where)
    if not found:
        raise ConfigError(
            f"train(resume=...): no complete checkpoint in {where}. Checkpoints are written by "
            ".with_checkpoints(every=N) (or with_training(save_steps=N)); start a new run without resume."
        )
    return found[-1]


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        lines = []
        for key in sorted(set(saved) | set(now), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                lines.append(f"{where}: {saved[key]!r} in the checkpoint, not set now")
            elif key not in saved:
                lines.append(f"{where}: not set in the checkpoint, {now[key]!r} now")
            else:
                lines.extend(_diff(saved[key], now[key], where))
        return lines
    if saved != now:
        return [f"{prefix}: {saved!r} in the checkpoint, {now!r} now"]
    return []


def check_resume(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Raise ConfigError listing every difference between the checkpoint's run and this one; return the
    checkpoint's record."""
    path = checkpoint / RESUME_FILE
    if not path.is_file():
        raise ConfigError(
            f"Cannot resume from {checkpoint}: it has no {RESUME_FILE}, so lorakit cannot check that it belongs "
            "to this pipeline and data. Resume only from checkpoints written by lorakit."
        )
    saved = json.loads(path.read_text())
    differences = _diff(saved.get("config"), meta["config"])
    if saved.get("data_fingerprint") != meta["data_fingerprint"]:
        differences.append(
            f"training data: the tokenized rows differ ({saved.get('train_rows')} rows, fingerprint "
            f"{str(saved.get('data_fingerprint'))[:12]} in the checkpoint; {meta['train_rows']} rows, "
            f"fingerprint {meta['data_fingerprint'][:12]} now)"
        )
    if differences:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: this run differs from the one that wrote it:\n  - "
            + "\n  - ".join(differences)
            + "\nResume with the same pipeline and data, or start a new run in another directory."
        )
    return saved


# --- early stopping -------------------------------------------------------------------------------------


class EarlyStopper:
    """Counts evaluations without improvement of one metric; says stop after ``patience`` of them."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.key = eval_key(spec.metric)
        self.best: float | None = None
        self.bad = 0
        self.stopped_step: int | None = None
        self.last_step: int | None = None

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Record one evaluation; True when training should stop."""
        if step == self.last_step:
            return self.stopped_step is not None
        if self.key not in metrics:
            known = sorted(k for k in metrics if k.startswith("eval_"))
            raise ConfigError(
                f"early_stopping(metric={self.spec.metric!r}): the evaluation produced no {self.key!r}; it "
                f"produced {known}. Pick one of those, or add the metric to with_eval(metrics=...)."
            )
        self.last_step = step
        value = float(metrics[self.key])
        delta = self.spec.min_delta
        if self.best is None:
            improved = True
        elif self.spec.direction == "min":
            improved = value < self.best - delta
        else:
            improved = value > self.best + delta
        if improved:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad >= self.spec.patience and self.stopped_step is None:
            self.stopped_step = step
        return self.stopped_step is not None

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "last_step": self.last_step}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.bad, self.last_step = (
                state.get("best"),
                state.get("bad", 0),
                state.get("last_step"),
            )


# --- trainer arguments ----------------------------------------------------------------------------------


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


# --- the trainer ----------------------------------------------------------------------------------------


def trainer_class(base: type) -> type:
    """``base`` (TRL's SFTTrainer) with atomic checkpoints, the NaN / inf guard, lorakit's evaluation
    numbers and early stopping."""
    import torch
    from transformers.trainer_utils import rotate_checkpoints

    class LorakitTrainer(base):  # type: ignore[misc, valid-type]
        lorakit_evaluator: Any = None
        lorakit_early_stop: EarlyStopper | None = None
        lorakit_resume_meta: dict[str, Any] | None = None
        lorakit_keep: int | None = None
        _lorakit_staging = False

        def _get_output_dir(self, trial: Any) -> str:
            run_dir = super()._get_output_dir(trial)
            return os.path.join(run_dir, STAGING_DIR) if self._lorakit_staging else run_dir

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run_dir = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            staged, final = run_dir / STAGING_DIR / name, run_dir / name
            if staged.exists():
                shutil.rmtree(staged)
            self._lorakit_staging = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._lorakit_staging = False
            if not self.args.should_save:
                return
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
                self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / STATE_FILE))
            record = dict(self.lorakit_resume_meta or {}, step=self.state.global_step)
            if self.lorakit_early_stop is not None:
                record["early_stop"] = self.lorakit_early_stop.state()
            write_json_atomic(staged / RESUME_FILE, record)
            if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
                old = run_dir / STAGING_DIR / f"{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staged, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, final)
            with contextlib.suppress(OSError):
                (run_dir / STAGING_DIR).rmdir()  # only when empty
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.lorakit_keep or self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not bool(torch.isfinite(loss).all()):
                step = self.state.global_step + 1
                found = list_checkpoints(Path(self.args.output_dir))
                kept = (
                    f"The last good checkpoint is {found[-1]} (step {_step(found[-1])}); nothing after it was "
                    "saved. Resume from it with train(dir, resume=True) once the cause is fixed."
                    if found
                    else "No checkpoint had been written yet (with_checkpoints(every=N) keeps one)."
                )
                raise TrainingError(
                    f"The training loss became {float(loss)} at step {step} (epoch {self.state.epoch or 0:.2f}); "
                    f"training stopped. {kept} Usual causes: a learning rate that is too high, fp16 overflow "
                    "(use bf16 or fp32), or a broken row in the data."
                )
            return loss

        def evaluate(
            self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> Any:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if metric_key_prefix != "eval":
                return metrics
            if self.lorakit_evaluator is not None:
                extra = self.lorakit_evaluator(self.model, metrics.get("eval_loss"))
                if extra:
                    self.log(dict(extra))
                    metrics.update(extra)
            wanted = self.args.metric_for_best_model
            if wanted is not None and eval_key(wanted) not in metrics:
                known = sorted(k for k in metrics if k.startswith("eval_"))
                raise ConfigError(
                    f"with_checkpoints(best_metric={wanted!r}): the evaluation produced no {eval_key(wanted)!r}; it "
                    f"produced {known}. Pick one of those, or add the metric to with_eval(metrics=...)."
                )
            stopper = self.lorakit_early_stop
            if stopper is not None and self.state.global_step > 0:
                before = stopper.stopped_step
                if stopper.update(metrics, self.state.global_step):
                    self.control.should_training_stop = True
                    if before is None:
                        print(
                            f"lorakit: early stopping at step {self.state.global_step}: {stopper.key} has not "
                            f"improved on {stopper.best} for {stopper.bad} evaluations.",
                            flush=True,
                        )
            return metrics

    return LorakitTrainer


def clean_staging(checkpoint_dir: Path) -> None:
    """Remove what a crash left half-written."""
    staging = checkpoint_dir / STAGING_DIR
    if staging.exists():
        warnings.warn(f"Removing the incomplete checkpoint left by a crash: {staging}", stacklevel=2)
        shutil.rmtree(staging, ignore_errors=True)


# --- run-directory housekeeping -------------------------------------------------------------------------

RUN_OUTPUTS = ("samples.jsonl", "report.md", "curves.png")
"""Files a run writes besides the adapter and metrics; a fresh run removes stale ones."""


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """A fresh run (``overwrite=True``) must not rotate or resume the previous run's checkpoints."""
    if checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log up to ``step``: the resumed run logs the later steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if int(entry.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def prepare_resume(output_dir: Path, checkpoint: Path) -> None:
    """Before resuming: drop what a crash left half-written and log lines past the checkpoint."""
    clean_staging(checkpoint.parent)
    step = _step(checkpoint)
    for name in ("metrics.jsonl", "samples.jsonl"):
        _truncate_log(output_dir / name, step)
    for name in ("metrics.json", "report.md", "curves.png"):
        (output_dir / name).unlink(missing_ok=True)


# --- what train() adds to the trainer -------------------------------------------------------------------

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
    keys = set(_TRAINER_EVAL_KEYS)
    specs = pipeline.evaluation.metrics if pipeline.evaluation is not None else ()
    for spec in specs:
        if not isinstance(spec, str) or spec not in _BUILTIN_KEYS:
            return None
        keys.update(f"eval_{key}" for key in _BUILTIN_KEYS[spec])
    return keys


class TrainingHooks:
    """Evaluation numbers, generation samples and early stopping for one ``train()`` call."""

    def __init__(self, pipeline: Any, val: Any, tokenizer: Any, template: Any, tracker: Any) -> None:
        from lorakit.evaluation import GenerationSet, TrainingEvaluator, sample_callback, sample_prompts

        self.callbacks: list[Any] = []
        self.evaluator: Any = None
        self.stopper = EarlyStopper(pipeline.early_stop) if pipeline.early_stop is not None else None
        self.keep = pipeline.checkpoints.keep if pipeline.checkpoints is not None else None
        spec = pipeline.evaluation
        if spec is not None:
            from lorakit.metrics import get_metric

            generation_set = None
            if val is not None and any(get_metric(m).needs == "text" for m in spec.metrics):
                generation_set = GenerationSet.from_dataset(
                    val, n=spec.samples, tokenizer=tokenizer, template=template
                )
                if not generation_set.prompts:
                    warnings.warn(
                        "with_eval(): no validation row has an untrained prompt to generate from (raw text, or "
                        "train_on_inputs=True), so the text metrics are skipped.",
                        stacklevel=3,
                    )
            self.evaluator = TrainingEvaluator(spec, generation_set, tokenizer, template)
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
                    stacklevel=3,
                )

    def install(self, trainer: Any, meta: dict[str, Any] | None, resumed: dict[str, Any] | None) -> None:
        trainer.lorakit_keep = self.keep
        trainer.lorakit_evaluator = self.evaluator
        trainer.lorakit_early_stop = self.stopper
        trainer.lorakit_resume_meta = meta
        if resumed is not None and self.stopper is not None:
            self.stopper.load(resumed.get("early_stop"))

    def summary(self, trainer: Any) -> dict[str, float]:
        """Early stopping and best-checkpoint numbers for ``metrics.json``."""
        out: dict[str, float] = {}
        if self.stopper is not None and self.stopper.stopped_step is not None:
            out["early_stopped_at_step"] = self.stopper.stopped_step
        state = trainer.state
        if state.best_model_checkpoint and state.best_metric is not None:
            out["best_step"] = _step(Path(state.best_model_checkpoint))
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


def training_hooks(pipeline: Any, val: Any, tokenizer: Any, template: Any, tracker: Any) -> TrainingHooks:
    return TrainingHooks(pipeline, val, tokenizer, template, tracker)

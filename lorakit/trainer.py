"""The one trainer: TRL's ``SFTTrainer`` with lorakit's checkpoints, accounting, guards and method hooks.

:class:`LorakitTrainer` adds, to TRL's SFTTrainer:

- token counting of every trained micro-batch and length-grouped batches (:mod:`lorakit.batching`);
- atomic checkpoints (written aside, published when complete; :mod:`lorakit.rundir`) holding the
  method's resume state, and lorakit's own checkpoint rotation (the best and the latest are kept);
- a NaN / inf loss guard naming the step and the last good checkpoint;
- lorakit's evaluation numbers, early stopping and the best-metric check;
- the method hooks (:mod:`lorakit.methods`): extra loss terms, a saving context, resume state;
- owned randomness: evaluation and every callback event run inside :func:`lorakit.rng.forked_rng`, so a run with
  evaluation, samples or trackers trains the same adapter, bit for bit, as one without.

It overrides and calls private names of transformers / TRL; :data:`PRIVATE_NAMES` lists every private (or
internal) third-party name lorakit relies on anywhere, with the versions it was checked against, and
:func:`private_name_problems` reports those an installed version lacks. This module imports torch, transformers
and TRL at its top: ``import lorakit`` never imports it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import shutil
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attrs
import torch
from packaging.version import Version
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import rotate_checkpoints
from trl import DPOTrainer, KTOTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from lorakit import checkpoints as ckpt
from lorakit import rundir as rd
from lorakit.batching import GroupedSampler, token_counts
from lorakit.config import eval_key
from lorakit.data.encode import IGNORE_INDEX
from lorakit.data.preference import PAIRED_COLUMNS, UNPAIRED_COLUMNS
from lorakit.errors import ConfigError, TrainingError
from lorakit.fused import fused_linear_cross_entropy, fused_loss_applies
from lorakit.rng import forked_rng

__all__ = [
    "PRIVATE_NAMES",
    "EarlyStopper",
    "LorakitCPOTrainer",
    "LorakitDPOTrainer",
    "LorakitKTOTrainer",
    "LorakitORPOTrainer",
    "LorakitTrainer",
    "LorakitTrainerMixin",
    "PrivateName",
    "private_name_problems",
]


# --- private third-party names lorakit relies on --------------------------------------------------------


@attrs.frozen
class PrivateName:
    """One private or internal third-party name lorakit overrides, reads, writes or calls."""

    package: str
    """The distribution that provides it (``importlib.metadata`` name)."""
    path: str
    """Dotted import path, e.g. ``"transformers.Trainer._save_checkpoint"``."""
    used_by: str
    """Where lorakit uses it, and how."""
    params: tuple[str, ...] | None = None
    """Parameters lorakit passes or receives, in order, ``self`` left out (callables only)."""
    set_in: str | None = None
    """For an instance attribute: the dotted path of the code that sets it (its source must name it)."""
    checked: tuple[str, str] = ("0", "0")
    """The lowest and highest installed version it was checked against (inclusive)."""
    value: Any = None
    """For a constant: the value lorakit relies on (None: not compared)."""


# (lowest, highest) checked: the lowest are pyproject's lower bounds, run by scripts/check_min_versions.py.
_TF, _TRL, _PEFT, _BNB, _TORCH = (
    ("5.24.0", "5.25.0"),
    ("1.10.0", "1.16.0"),
    ("0.19.1", "0.21.2"),
    ("0.50.0", "0.50.2"),
    ("2.13.0", "2.13.0"),
)

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # lorakit/trainer.py: LorakitTrainer
    PrivateName(
        "trl",
        "trl.SFTTrainer._save_checkpoint",
        "trainer.py: overridden (atomic checkpoints)",
        ("model", "trial"),
        checked=_TRL,
    ),
    PrivateName(
        "transformers",
        "transformers.Trainer._load_best_model",
        "trainer.py: overridden (the method's saving context and state around it)",
        (),
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.Trainer._get_output_dir",
        "trainer.py: overridden (staging dir)",
        ("trial",),
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.Trainer._get_train_sampler",
        "trainer.py: overridden (grouping)",
        ("train_dataset",),
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.Trainer.current_gradient_accumulation_steps",
        "trainer.py: read to scale a method's extra loss",
        set_in="transformers.trainer.Trainer",
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.trainer_callback.CallbackHandler.call_event",
        "trainer.py: overridden (every callback event inside forked_rng)",
        ("event", "args", "state", "control"),
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.trainer_utils.rotate_checkpoints",
        "trainer.py: called after each atomic checkpoint (Trainer._rotate_checkpoints before v5)",
        ("output_dir", "save_total_limit", "best_model_checkpoint"),
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.trainer_utils.PREFIX_CHECKPOINT_DIR",
        "trainer.py: rotate_checkpoints finds the checkpoints named rundir.checkpoint_name(step) by it",
        value=rd.CHECKPOINT_PREFIX.removesuffix("-"),
        checked=_TF,
    ),
    # lorakit/trainer.py: the preference trainers (lorakit tokenizes the rows; TRL's tokenization is skipped)
    *(
        PrivateName(
            "trl",
            f"trl.{name}._prepare_dataset",
            "trainer.py: overridden (lorakit's tokenized rows pass through)",
            ("dataset", "processing_class", "args", "dataset_name"),
            checked=_TRL,
        )
        for name in ("DPOTrainer", "KTOTrainer")
    ),
    PrivateName(
        "trl",
        "trl.KTOTrainer.calculate_KL",
        "trainer.py: read (the KL completions of lorakit's unpaired rows)",
        set_in="trl.trainer.kto_trainer.KTOTrainer.__init__",
        checked=_TRL,
    ),
    PrivateName(
        "trl",
        "trl.DPOTrainer._save_checkpoint",
        "trainer.py: overridden by the mixin (atomic checkpoints)",
        ("model", "trial"),
        checked=_TRL,
    ),
    *(
        PrivateName(
            "trl",
            f"trl.experimental.{module}.{name}.tokenize_row",
            "trainer.py: overridden (lorakit's tokenized rows pass through)",
            ("feature", "model"),
            checked=_TRL,
        )
        for module, name in (("orpo", "ORPOTrainer"), ("cpo", "CPOTrainer"))
    ),
    # lorakit/methods/lora.py: apply_loftq
    PrivateName(
        "peft",
        "peft.utils.loftq_utils._low_rank_decomposition",
        "methods/lora.py: apply_loftq",
        ("weight", "reduced_rank"),
        checked=_PEFT,
    ),
    PrivateName(
        "peft",
        "peft.utils.loftq_utils._SafetensorLoader",
        "methods/lora.py: apply_loftq",
        ("peft_model", "model_path"),
        checked=_PEFT,
    ),
    PrivateName(
        "peft",
        "peft.utils.loftq_utils._SafetensorLoader.get_tensor",
        "methods/lora.py: apply_loftq",
        ("name",),
        checked=_PEFT,
    ),
    # lorakit/methods/adalora.py: resume state
    PrivateName(
        "peft",
        "peft.tuners.adalora.model.AdaLoraModel.rankallocator",
        "methods/adalora.py: resume state",
        set_in="peft.tuners.adalora.model.AdaLoraModel.__init__",
        checked=_PEFT,
    ),
    *(
        PrivateName(
            "peft",
            f"peft.tuners.adalora.layer.RankAllocator.{name}",
            "methods/adalora.py: resume state",
            set_in="peft.tuners.adalora.layer.RankAllocator.reset_ipt",
            checked=_PEFT,
        )
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")
    ),
    PrivateName(
        "peft",
        "peft.tuners.adalora.model.AdaLoraModel.update_and_allocate",
        "methods/adalora.py: rank allocation callback",
        ("global_step",),
        checked=_PEFT,
    ),
    # lorakit/generation.py: prompt_learning_generation patches these per call
    PrivateName(
        "peft",
        "peft.PeftModelForCausalLM.prepare_inputs_for_generation",
        "generation.py: replaced during generate()",
        checked=_PEFT,
    ),
    PrivateName(
        "peft",
        "peft.PeftModelForCausalLM.base_model_prepare_inputs_for_generation",
        "generation.py: replaced during generate()",
        set_in="peft.PeftModelForCausalLM.__init__",
        checked=_PEFT,
    ),
    # lorakit/models.py: disable_cpu_4bit_repacking
    PrivateName(
        "bitsandbytes",
        "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu",
        "models.py: disable_cpu_4bit_repacking sets it False",
        set_in="bitsandbytes.nn.Linear4bit.__init__",
        checked=_BNB,
    ),
    # lorakit/distributed.py, memory.py, embedded.py
    PrivateName(
        "transformers",
        "transformers.AutoModelForCausalLM._model_mapping",
        "distributed.py: the model class of a config",
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.PreTrainedModel._no_split_modules",
        "distributed.py: FSDP wrap classes",
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.PreTrainedModel._keep_in_fp32_modules",
        "memory.py: modules bitsandbytes leaves unquantized",
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.PreTrainedConfig._name_or_path",
        "embedded.py: written (the model's alias)",
        set_in="transformers.configuration_utils",
        checked=_TF,
    ),
    PrivateName(
        "transformers",
        "transformers.PreTrainedConfig._is_quantized",
        "embedded.py: cleared after de-quantizing",
        set_in="transformers.quantizers.base",
        checked=_TF,
    ),
)
"""Every private (or internal, undocumented) name of torch / transformers / TRL / PEFT / bitsandbytes /
accelerate that lorakit overrides, reads, writes or calls. ``embedded.py`` also removes
``_pre_quantization_dtype`` / ``_model_name_or_path`` only when present (transformers 5.25 has neither)."""


def _resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            target = getattr(target, part)
        return target
    raise ImportError(f"no module in {path!r}")


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _problem(entry: PrivateName, installed: str) -> str | None:
    """What is wrong with one entry on the installed version, or None."""
    where = f"{entry.package} {installed}: {entry.path} (used by {entry.used_by})"
    try:
        if entry.set_in is not None:  # an instance attribute: the code that sets it must name it
            owner, name = _resolve(entry.set_in), entry.path.rsplit(".", 1)[1]
            if name not in inspect.getsource(owner):
                return f"{where}: {entry.set_in} no longer sets {name!r}"
            return None
        target = _resolve(entry.path)
    except (ImportError, AttributeError) as error:
        return f"{where}: missing ({error})"
    except (OSError, TypeError) as error:
        return f"{where}: cannot read the source of {entry.set_in} ({error})"
    if entry.value is not None and target != entry.value:
        return f"{where}: the value is {target!r}, lorakit relies on {entry.value!r}"
    if entry.params is None:
        return None
    try:
        found = tuple(name for name in inspect.signature(target).parameters if name != "self")
    except (TypeError, ValueError) as error:
        return f"{where}: not a callable with a signature ({error})"
    if found[: len(entry.params)] != entry.params:
        return f"{where}: parameters are {found}, lorakit relies on {entry.params}"
    return None


def private_name_problems(names: Sequence[PrivateName] = PRIVATE_NAMES) -> list[str]:
    """One line per private name the installed packages lack or changed (packages not installed are skipped)."""
    problems = []
    for entry in names:
        installed = _installed(entry.package)
        if installed is not None:
            problem = _problem(entry, installed)
            if problem is not None:
                problems.append(problem)
    return problems


def unchecked_versions(names: Sequence[PrivateName] = PRIVATE_NAMES) -> list[str]:
    """The entries whose installed package version lies outside the range they were checked against."""
    found = []
    for entry in names:
        installed = _installed(entry.package)
        low, high = entry.checked
        if installed is not None and not Version(low) <= Version(installed) <= Version(high):
            found.append(f"{entry.path}: checked on {entry.package} {low}-{high}, installed {installed}")
    return found


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


# --- owned randomness and resume state ------------------------------------------------------------------


class RngIsolatedCallbackHandler(CallbackHandler):
    """Runs every callback event inside :func:`forked_rng`: a callback (samples, trackers, user code) cannot
    change the random numbers training draws."""

    def call_event(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        with forked_rng():
            return super().call_event(event, args, state, control, **kwargs)


class MethodStateRestore(TrainerCallback):
    """On a resumed run, hands the checkpoint's method resume state to the method once the weights are loaded
    (``on_train_begin`` runs after the Trainer loaded the checkpoint, FSDP and DeepSpeed included)."""

    def __init__(self, trainer: LorakitTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer.lorakit_method is None or trainer.lorakit_resume_from is None:
            return
        saved = ckpt.read_method_state(Path(trainer.lorakit_resume_from))
        if saved is not None:
            trainer.lorakit_method.load_resume_state(trainer.model, *saved)


# --- the trainer ----------------------------------------------------------------------------------------


class LorakitTrainerMixin:
    """lorakit's checkpoints, token counts, guards, evaluation and method hooks, for any TRL trainer: listed first
    in the bases (``class LorakitTrainer(LorakitTrainerMixin, SFTTrainer)``), so its ``super()`` is the TRL trainer.

    Keyword arguments besides the TRL trainer's: ``method`` (the method spec whose hooks run), ``evaluator`` (called
    with the model and the eval loss after each evaluation, returns more ``eval_*`` numbers), ``early_stop``
    (an :class:`EarlyStopper`), ``resume_meta`` (recorded in every checkpoint) and ``keep`` (checkpoints kept).
    """

    def __init__(
        self,
        *args: Any,
        method: Any = None,
        evaluator: Any = None,
        early_stop: EarlyStopper | None = None,
        resume_meta: dict[str, Any] | None = None,
        keep: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.lorakit_method = method
        self.lorakit_evaluator = evaluator
        self.lorakit_early_stop = early_stop
        self.lorakit_resume_meta = resume_meta
        self.lorakit_keep = keep
        self.lorakit_resume_from: str | None = None
        self._lorakit_counts: tuple[int, ...] = (0, 0, 0)
        self._lorakit_lengths: list[int] | None = None
        self._lorakit_staging = False
        self._lorakit_fused = False
        self._lorakit_eval_nll: list[float] = [0.0, 0.0]  # summed NLL and label tokens of one evaluation
        self._lorakit_last_eval: tuple[int, dict[str, Any]] | None = None  # (step, metrics) of the last one
        super().__init__(*args, **kwargs)
        self.callback_handler.__class__ = RngIsolatedCallbackHandler  # same state, forked events
        self.add_callback(MethodStateRestore(self))

    # --- batching and token counts

    def group_by_length(self, lengths: Sequence[int]) -> None:
        """Sample the training rows (of these lengths) in length-grouped batches."""
        self._lorakit_lengths = list(lengths)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self._lorakit_lengths is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return GroupedSampler(self._lorakit_lengths, self.args.per_device_train_batch_size, seed)

    def token_totals(self) -> dict[str, int]:
        """Counts of all trained micro-batches, summed over the processes (a collective: call on all)."""
        counts = torch.tensor(self._lorakit_counts, dtype=torch.int64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        tokens, computed, loss_tokens = (int(value) for value in counts.tolist())
        return {"tokens": tokens, "computed_tokens": computed, "loss_tokens": loss_tokens}

    # --- the training step: counts, the method's extra loss, the NaN / inf guard

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self.lorakit_resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        counted = self._count_tokens(inputs)
        self._lorakit_counts = tuple(a + b for a, b in zip(self._lorakit_counts, counted, strict=True))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            self._raise_non_finite(loss)
        return loss

    def _count_tokens(self, inputs: Any) -> tuple[int, int, int]:
        """``(tokens, computed_tokens, loss_tokens)`` of one collated batch."""
        return token_counts(inputs)

    def _raise_non_finite(self, loss: Any) -> None:
        step = self.state.global_step + 1
        found = rd.list_checkpoints(Path(str(self.args.output_dir)))
        kept = (
            f"The last good checkpoint is {found[-1]} (step {rd.checkpoint_step(found[-1])}); nothing after it "
            "was saved. Resume from it with train(dir, resume=True) once the cause is fixed."
            if found
            else "No checkpoint had been written yet (with_checkpoints(every=N) keeps one)."
        )
        raise TrainingError(
            f"The training loss became {float(loss)} at step {step} (epoch {self.state.epoch or 0:.2f}); "
            f"training stopped. {kept} Usual causes: a learning rate that is too high, fp16 overflow "
            "(use bf16 or fp32), or a broken row in the data."
        )

    # --- evaluation: forked randomness, lorakit's numbers, early stopping

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> Any:
        # The evaluation data loader draws its base seed from the global torch RNG; the evaluator generates.
        with forked_rng():
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if metric_key_prefix != "eval":
                return metrics
            if self.lorakit_evaluator is not None:
                extra = self.lorakit_evaluator(self.model, metrics.get("eval_loss"))
                if extra:
                    self.log(dict(extra))
                    metrics.update(extra)
        self._lorakit_last_eval = (self.state.global_step, dict(metrics))
        self._check_best_metric(metrics)
        self._early_stop(metrics)
        return metrics

    def final_evaluation(self) -> dict[str, Any]:
        """The evaluation of the weights training ended with. When the last evaluation ran at the final step and
        those weights are still the model's (no best checkpoint loaded over them), its numbers are the answer:
        evaluation is deterministic (forked randomness), so running it again would only repeat the same numbers
        and log them twice."""
        step, last = self.state.global_step, self._lorakit_last_eval
        reloaded = (
            self.args.load_best_model_at_end
            and self.state.best_model_checkpoint is not None
            and self.state.best_global_step != step
        )
        if last is not None and last[0] == step and not reloaded:
            return dict(last[1])
        return self.evaluate()

    def _check_best_metric(self, metrics: dict[str, Any]) -> None:
        wanted = self.args.metric_for_best_model
        if wanted is not None and eval_key(wanted) not in metrics:
            known = sorted(k for k in metrics if k.startswith("eval_"))
            raise ConfigError(
                f"with_checkpoints(best_metric={wanted!r}): the evaluation produced no {eval_key(wanted)!r}; it "
                f"produced {known}. Pick one of those, or add the metric to with_eval(metrics=...)."
            )

    def _early_stop(self, metrics: dict[str, Any]) -> None:
        stopper = self.lorakit_early_stop
        if stopper is None or self.state.global_step <= 0:
            return
        before = stopper.stopped_step
        if stopper.update(metrics, self.state.global_step):
            self.control.should_training_stop = True
            if before is None:
                print(
                    f"lorakit: early stopping at step {self.state.global_step}: {stopper.key} has not improved on "
                    f"{stopper.best} for {stopper.bad} evaluations.",
                    flush=True,
                )

    # --- atomic checkpoints with the method's resume state

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, rd.STAGING_DIR) if self._lorakit_staging else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir, step = Path(super()._get_output_dir(trial)), self.state.global_step
        name = rd.checkpoint_name(step)
        staged, final = run_dir / rd.STAGING_DIR / name, run_dir / name
        if staged.exists():
            shutil.rmtree(staged)
        saving = self.lorakit_method.saving(self.model, checkpoint=True) if self.lorakit_method else None
        self._lorakit_staging = True
        try:
            with saving or contextlib.nullcontext():
                super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError):  # e.g. a full disk: the half-written copy only takes space
            rd.clean_staging(run_dir, quiet=True)
            raise
        finally:
            self._lorakit_staging = False
        if not self.args.should_save:
            return
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)
        try:
            self._write_lorakit_state(staged)
        except OSError:
            rd.clean_staging(run_dir, quiet=True)
            raise
        rd.publish_checkpoint(run_dir, step)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.lorakit_keep or self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )

    def _load_best_model(self) -> None:
        """The best checkpoint's weights, loaded as the method saved them, then its method state (e.g. the rank
        pattern that goes with the weights)."""
        saving = self.lorakit_method.saving(self.model, checkpoint=True) if self.lorakit_method else None
        with saving or contextlib.nullcontext():
            super()._load_best_model()
        best = self.state.best_model_checkpoint
        saved = ckpt.read_method_state(Path(best)) if best and self.lorakit_method is not None else None
        if saved is not None:
            self.lorakit_method.load_resume_state(self.model, *saved)

    def _write_lorakit_state(self, staged: Path) -> None:
        """The trainer state (best checkpoint renamed), the method's resume state, the resume record, then the
        seal: every file flushed to disk and listed with its SHA-256 (:func:`lorakit.rundir.seal_checkpoint`)."""
        self.state.save_to_json(str(staged / rd.STATE_FILE))
        saved = self.lorakit_method.resume_state(self.model) if self.lorakit_method is not None else None
        if saved is not None:
            ckpt.write_method_state(staged, *saved)
        record = dict(self.lorakit_resume_meta or {}, step=self.state.global_step)
        if self.lorakit_early_stop is not None:
            record["early_stop"] = self.lorakit_early_stop.state()
        ckpt.write_resume_record(staged, record)
        rd.seal_checkpoint(staged)


class LorakitTrainer(LorakitTrainerMixin, SFTTrainer):
    """The one SFT trainer: TRL's SFTTrainer with :class:`LorakitTrainerMixin`, the method's extra loss term and
    lorakit's token-weighted ``eval_loss``."""

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """SFTTrainer's loss plus the method's extra loss term (``extra_loss`` hook): SFTTrainer computes the
        loss from the logits and never reads a term a PEFT model adds to ``outputs.loss``."""
        if not model.training:
            return self._lorakit_eval_loss(model, inputs, return_outputs)
        if self._lorakit_fused and not return_outputs:
            result = self._lorakit_fused_loss(model, inputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.lorakit_method is None:
            return result
        extra = self.lorakit_method.extra_loss(self.accelerator.unwrap_model(model))
        if extra is None:
            return result
        # With num_items_in_batch the loss of a micro-batch is a share of the accumulated step's loss.
        if num_items_in_batch is not None:
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    def use_fused_loss(self, on: bool = True) -> bool:
        """Train with :func:`lorakit.fused.fused_linear_cross_entropy` where it applies (a plain linear LM head,
        one process: the backbone is called past the DDP wrapper); returns whether it does. The training log then
        has no ``entropy`` / ``mean_token_accuracy`` (TRL computes them from the full logits)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._lorakit_fused = on and self.accelerator.num_processes == 1 and fused_loss_applies(unwrapped)
        return self._lorakit_fused

    def _lorakit_fused_loss(self, model: Any, inputs: Any, num_items_in_batch: Any) -> Any:
        """The training loss as TRL's (summed NLL over ``num_items_in_batch``, else this batch's loss tokens),
        from the backbone's hidden states and the LM head's weight, without the logits."""
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        with self.accelerator.autocast():
            hidden = base.base_model(**kwargs, use_cache=False).last_hidden_state
            total, count = fused_linear_cross_entropy(
                hidden, base.get_output_embeddings().weight, inputs["labels"]
            )
        return total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))

    def _lorakit_eval_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
        """An evaluation batch's loss (this batch's mean over its label tokens), also added to the running sums
        that make ``eval_loss`` lorakit's one loss: a token-weighted mean over the whole evaluation set
        (:mod:`lorakit.metrics.loss`), not the Trainer's mean of per-batch means."""
        result = super().compute_loss(model, inputs, return_outputs, None)  # None: this batch's own mean
        loss = result[0] if return_outputs else result
        count = int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum()) if "labels" in inputs else 0
        self._lorakit_eval_nll[0] += float(loss.detach().float()) * count
        self._lorakit_eval_nll[1] += count
        return result

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._lorakit_eval_nll = [0.0, 0.0]
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        sums = torch.tensor(self._lorakit_eval_nll, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        total, count = (float(value) for value in sums.tolist())
        if count > 0 and f"{prefix}_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = total / count
        return output


# --- preference trainers (lorakit.preference names them) --------------------------------------------------


def _preference_counts(inputs: dict[str, Any]) -> tuple[int, int, int]:
    """Token counts of a preference batch: DPO / KTO batches carry ``input_ids`` and a ``completion_mask`` (the
    scored tokens); ORPO / CPO batches ``chosen_*`` / ``rejected_*`` sequences with labels."""
    if "input_ids" in inputs:
        tokens, computed, _ = token_counts(inputs)
        return tokens, computed, int(inputs["completion_mask"].sum())
    counts = [
        token_counts(
            {
                "input_ids": inputs[f"{side}_input_ids"],
                "attention_mask": inputs[f"{side}_attention_mask"],
                "labels": inputs[f"{side}_labels"],
            }
        )
        for side in ("chosen", "rejected")
    ]
    return tuple(a + b for a, b in zip(*counts, strict=True))  # type: ignore[return-value]


class _PreferenceCounts:
    """Token counts of preference batches (listed before :class:`LorakitTrainerMixin` in the bases)."""

    def _count_tokens(self, inputs: Any) -> tuple[int, int, int]:
        return _preference_counts(inputs)


class LorakitDPOTrainer(_PreferenceCounts, LorakitTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with :class:`LorakitTrainerMixin`. lorakit tokenizes the rows itself
    (:mod:`lorakit.data.preference`: ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` rendered with the run's
    template exactly as SFT renders them), so TRL's own tokenization is skipped for such a dataset."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if PAIRED_COLUMNS[0] in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class LorakitKTOTrainer(_PreferenceCounts, LorakitTrainerMixin, KTOTrainer):
    """TRL's KTOTrainer with :class:`LorakitTrainerMixin`, on lorakit's tokenized unpaired rows
    (``prompt_ids`` / ``completion_ids`` / ``label``)."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if UNPAIRED_COLUMNS[1] not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.calculate_KL:
            return dataset

        # TRL's KL estimate: each batch's completions rotated by one, paired with the other prompts.
        def rotate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            completions = batch["completion_ids"]
            batch["KL_completion_ids"] = [completions[-1], *completions[:-1]]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


def _orpo_features(feature: dict[str, Any]) -> dict[str, Any]:
    """ORPO / CPO's tokenized row (``prompt_input_ids``, ``chosen_labels``, ...) from lorakit's paired ids."""
    prompt = list(feature["prompt_ids"])
    out: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + list(feature[f"{side}_ids"])
    return out


class LorakitORPOTrainer(_PreferenceCounts, LorakitTrainerMixin, ORPOTrainer):
    """TRL's (experimental) ORPOTrainer with :class:`LorakitTrainerMixin`, on lorakit's tokenized paired rows."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        if PAIRED_COLUMNS[0] in feature:
            return _orpo_features(feature)
        return super().tokenize_row(feature, model)


class LorakitCPOTrainer(_PreferenceCounts, LorakitTrainerMixin, CPOTrainer):
    """TRL's (experimental) CPOTrainer (CPO, SimPO) with :class:`LorakitTrainerMixin`, on lorakit's tokenized
    paired rows."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        if PAIRED_COLUMNS[0] in feature:
            return _orpo_features(feature)
        return super().tokenize_row(feature, model)

"""Preference tuning: the objective a run optimises instead of SFT's next-token loss (``with_preference``).

One home for the concept: :class:`PreferenceSpec` (the objective, ``beta`` and its options, validated at the
builder call), the :data:`OBJECTIVES` registry (objective name -> the TRL trainer and config that run it, the
data it needs, whether it has a reference model, the evaluation keys it logs), the reference-model decision,
the ``explain()`` lines and the memory adjustment. The data side lives in :mod:`lorakit.data.preference`, the
trainer classes (TRL's trainers with :class:`lorakit.trainer.LorakitTrainerMixin`) in :mod:`lorakit.trainer`.

This module stays light: it names TRL's classes by import path; :mod:`lorakit.training` imports them.

The reference model never costs a second copy of the base weights (TRL 1.16 decides this from the model it is
given, ``ref_model=None``):

- a new adapter: the reference is the policy with its adapter disabled (``use_adapter(model, None)``);
- starting from an earlier run (:meth:`lorakit.Pipeline.from_run`): the starting adapter is loaded trainable
  as ``"default"`` and TRL copies it once into a frozen adapter named ``"ref"`` (TRL 1.16 has no
  ``ref_adapter_name`` / ``model_adapter_name`` options; the name is fixed), which the reference forward uses;
- ORPO and CPO / SimPO are reference-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from lorakit.errors import ConfigError

__all__ = [
    "OBJECTIVES",
    "REFERENCE_ADAPTER",
    "Objective",
    "PreferenceSpec",
    "adjust_memory",
    "check_method",
    "eval_keys",
    "plan_lines",
    "reference_text",
]

REFERENCE_ADAPTER = "ref"
"""The name TRL 1.16 gives the frozen copy of a starting adapter (hard-coded in its DPO / KTO trainers)."""

_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")
_LOGS = ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


@attrs.frozen
class Objective:
    """One preference objective and the installed TRL classes that run it."""

    name: str
    """The name ``with_preference()`` takes."""
    trainer: str
    """The trainer class in :mod:`lorakit.trainer` (TRL's trainer with lorakit's mixin)."""
    config: str
    """Import path of TRL's config class."""
    paired: bool
    """Rows are ``prompt`` / ``chosen`` / ``rejected`` (else unpaired ``prompt`` / ``completion`` / ``label``)."""
    reference: bool
    """The loss compares the policy with a frozen reference model."""
    options: tuple[str, ...]
    """TRL config fields ``with_preference(**options)`` may set (``beta`` always)."""
    metrics: tuple[str, ...]
    """The keys the trainer logs (``eval_`` prefixed in evaluation)."""
    summary: str
    """One line for ``explain()``."""
    refuses: tuple[str, ...] = ()
    """Adapter methods this objective cannot train (see :data:`_OBJECTIVE_REFUSALS`)."""


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo",
        "LorakitDPOTrainer",
        "trl.DPOConfig",
        paired=True,
        reference=True,
        options=("loss_type", "label_smoothing", "ld_alpha", "use_weighting", "precompute_ref_log_probs"),
        metrics=(*_REWARDS, "rewards/accuracies", *_LOGS, "entropy", "mean_token_accuracy"),
        summary="DPO (direct preference optimisation; loss_type='ipo', 'hinge', ... select its variants)",
    ),
    "kto": Objective(
        "kto",
        "LorakitKTOTrainer",
        "trl.KTOConfig",
        paired=False,
        reference=True,
        options=("loss_type", "desirable_weight", "undesirable_weight", "precompute_ref_log_probs"),
        metrics=(*_REWARDS, *_LOGS, "kl", "entropy"),
        summary="KTO (unpaired: each completion labelled desirable or not)",
    ),
    "orpo": Objective(
        "orpo",
        "LorakitORPOTrainer",
        "trl.experimental.orpo.ORPOConfig",
        paired=True,
        reference=False,
        options=("max_completion_length",),
        metrics=(*_REWARDS, "rewards/accuracies", *_LOGS, "nll_loss", "log_odds_ratio"),
        summary="ORPO (odds-ratio preference loss added to the SFT loss; TRL experimental)",
        refuses=("prompt_tuning", "ptuning"),
    ),
    "cpo": Objective(
        "cpo",
        "LorakitCPOTrainer",
        "trl.experimental.cpo.CPOConfig",
        paired=True,
        reference=False,
        options=("loss_type", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha"),
        metrics=(*_REWARDS, "rewards/accuracies", *_LOGS, "nll_loss"),
        summary="CPO (contrastive preference optimisation; loss_type='simpo' for SimPO; TRL experimental)",
        refuses=("prompt_tuning", "ptuning"),
    ),
}
"""Objective name -> :class:`Objective`: every objective ``with_preference()`` accepts."""

_UNSUPPORTED_METHODS = {
    "full": (
        "full fine-tuning / freeze() has no adapter to disable, so the reference would be a second full copy "
        "of the model"
    ),
    "adalora": (
        "AdaLoRA's rank allocation and orthogonality term hook into lorakit's SFT loss, which the preference "
        "trainers do not use"
    ),
}
"""Methods refused with a preference objective, and why."""


_OBJECTIVE_REFUSALS = (
    "TRL's ORPO / CPO loss compares logits with labels position by position and does not skip the virtual "
    "tokens PEFT prepends to the logits"
)
"""Why an objective refuses the methods in :attr:`Objective.refuses` (found by training each on a tiny model)."""


def _check_objective(instance: Any, attribute: Any, value: Any) -> None:
    if value not in OBJECTIVES:
        raise ConfigError(
            f"with_preference({value!r}): unknown objective; choose one of {', '.join(map(repr, OBJECTIVES))}."
        )


def _check_beta(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(
            f"with_preference(beta=...) must be a positive number, got {value!r}. Use e.g. 0.1."
        )


def _options(value: Any) -> tuple[tuple[str, Any], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(key), item) for key, item in items))


@attrs.frozen
class PreferenceSpec:
    """A preference objective (set by :meth:`lorakit.Pipeline.with_preference`)."""

    objective: str = attrs.field(validator=_check_objective)
    """``"dpo"``, ``"kto"``, ``"orpo"`` or ``"cpo"`` (see :data:`OBJECTIVES`)."""
    beta: float = attrs.field(default=0.1, validator=_check_beta)
    """The objective's temperature: how far the policy may move from the reference (DPO / KTO), or the weight
    of the odds-ratio / preference term (ORPO / CPO)."""
    options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_options)
    """More fields of the TRL config, sorted ``(name, value)`` pairs (see :attr:`Objective.options`)."""

    def __attrs_post_init__(self) -> None:
        allowed = OBJECTIVES[self.objective].options
        unknown = [name for name, _ in self.options if name not in allowed]
        if unknown:
            valid = ", ".join(("beta", *allowed))
            raise ConfigError(
                f"with_preference({self.objective!r}): unknown option(s) {', '.join(unknown)}; valid options: "
                f"{valid}."
            )

    @property
    def info(self) -> Objective:
        """The registry entry of this objective."""
        return OBJECTIVES[self.objective]

    def config_kwargs(self) -> dict[str, Any]:
        """The TRL config fields this spec sets."""
        return {"beta": float(self.beta), **dict(self.options)}

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "beta": self.beta, "options": dict(self.options)}


def check_method(spec: PreferenceSpec | None, method: Any) -> None:
    """Raise ConfigError when ``method`` (a method spec, or None for LoRA) cannot train with ``spec``."""
    if spec is None or method is None:
        return
    why = _UNSUPPORTED_METHODS.get(method.name)
    if why is None and method.name in spec.info.refuses:
        why = _OBJECTIVE_REFUSALS
    if why is not None:
        raise ConfigError(
            f"with_preference({spec.objective!r}) cannot train with {method.builder_call()}: {why}. Use "
            "with_lora() (or another adapter method: ia3, prefix_tuning, prompt_tuning / ptuning with dpo or kto)."
        )


def eval_keys(spec: PreferenceSpec) -> set[str]:
    """The ``eval_*`` keys an evaluation of this objective produces."""
    return {"eval_loss", *(f"eval_{key}" for key in spec.info.metrics)}


def reference_text(spec: PreferenceSpec, start: Any) -> str:
    """Which model is the reference, for ``explain()`` and the run's notes."""
    if not spec.info.reference:
        return "none (reference-free objective)"
    if start is not None and start.adapter:
        return (
            f"the starting adapter of {start.path}, kept frozen as adapter 'ref' (no second copy of the base; "
            "one more adapter in memory)"
        )
    return "the policy with its adapter disabled (the base model; no second copy)"


def plan_lines(spec: PreferenceSpec, start: Any) -> list[str]:
    """The ``explain()`` lines of a preference run."""
    options = ", ".join(f"{name}={value!r}" for name, value in spec.options)
    return [
        f"  objective        {spec.info.summary}",
        f"  beta             {spec.beta}" + (f" ({options})" if options else ""),
        f"  reference        {reference_text(spec, start)}",
    ]


def adjust_memory(memory: Any, spec: PreferenceSpec, start: Any) -> Any:
    """The plan's memory estimate for a preference run: paired objectives run chosen and rejected in one batch
    (twice the sequences); the reference forward keeps no activations; a frozen ``ref`` adapter adds its size."""
    factor = 2 if spec.info.paired else 1
    extra = memory.adapter if spec.info.reference and start is not None and start.adapter else 0
    notes = [*memory.notes]
    if factor > 1:
        notes.append("chosen and rejected run in one batch: activations for twice the sequences")
    if extra:
        notes.append("the frozen reference adapter 'ref' adds one adapter's weights")
    return attrs.evolve(
        memory,
        weights=memory.weights + extra,
        activations=memory.activations * factor,
        batch_size=memory.batch_size * factor,
        notes=tuple(notes),
    )

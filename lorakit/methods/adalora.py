"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated during training (Zhang et al., 2023).

Each adapted linear layer starts with ``init_r`` singular triplets; between step ``tinit`` and step
``total_step - tfinal`` the least important triplets are masked until the average rank is ``target_r``, then the
remaining ones are fine-tuned. PEFT needs the run's ``total_step``: lorakit fills it in from the planned number of
optimizer steps when ``train()`` starts, and calls ``update_and_allocate`` after every optimizer step.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, positive_int
from lorakit.errors import ConfigError
from lorakit.methods.lora import check_targets, to_targets

__all__ = ["AdaLoraSpec", "orth_regularization", "rank_allocation_callback", "rank_pattern_sizes"]


def _non_negative_int(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"with_adalora({attribute.name}={value!r}) must be an integer >= 0 (a number of steps)."
        )


@attrs.frozen
class AdaLoraSpec:
    """AdaLoRA options; ``to_peft_config(total_step)`` builds the ``peft.AdaLoraConfig``."""

    name: ClassVar[str] = "adalora"
    mergeable: ClassVar[bool] = True

    init_r: int = attrs.field(default=12, validator=positive_int("Typical initial ranks are 8-16."))
    """Rank every adapted layer starts with."""
    target_r: int = attrs.field(default=8, validator=positive_int("It must not exceed init_r."))
    """Average rank per layer left after the budget has been re-allocated."""
    alpha: float = attrs.field(
        default=32, validator=number_in(0, 1e6, low_open=True, fix="Typically 2-4 * init_r.")
    )
    """Scaling numerator of the update (as LoRA's ``alpha``)."""
    dropout: float = attrs.field(default=0.05, validator=number_in(0.0, 1.0, high_open=True))
    """Dropout on the adapter input."""
    targets: str | tuple[str, ...] = attrs.field(default="all-linear", converter=to_targets)
    """``"all-linear"`` or a tuple of module names, e.g. ("q_proj", "v_proj")."""
    tinit: int = attrs.field(default=0, validator=_non_negative_int)
    """Warm-up steps at the full rank ``init_r`` before the budget starts shrinking."""
    tfinal: int = attrs.field(default=0, validator=_non_negative_int)
    """Final steps that fine-tune the allocated ranks without changing them."""
    deltaT: int = attrs.field(default=1, validator=positive_int("1 re-allocates after every step."))  # noqa: N815
    """Steps between two budget re-allocations."""
    beta1: float = attrs.field(default=0.85, validator=number_in(0, 1, low_open=True, high_open=True))
    """EMA coefficient of the sensitivity (importance) estimate."""
    beta2: float = attrs.field(default=0.85, validator=number_in(0, 1, low_open=True, high_open=True))
    """EMA coefficient of the uncertainty estimate."""
    orth_reg_weight: float = attrs.field(default=0.5, validator=number_in(0, 1e6))
    """Weight of the orthogonality penalty on the singular vectors (``P^T P - I``, ``Q Q^T - I``)."""

    @targets.validator
    def _check_targets(self, attribute: attrs.Attribute, value: Any) -> None:
        check_targets(value)

    def __attrs_post_init__(self) -> None:
        if self.target_r > self.init_r:
            raise ConfigError(
                f"with_adalora(target_r={self.target_r}) exceeds init_r={self.init_r}: AdaLoRA only removes rank. "
                "Pick target_r <= init_r (e.g. init_r=12, target_r=8)."
            )

    def check_steps(self, total_step: int) -> None:
        """Raise ConfigError unless the warm-up and final phases leave steps to re-allocate the budget in."""
        if self.tinit + self.tfinal >= total_step:
            raise ConfigError(
                f"with_adalora(tinit={self.tinit}, tfinal={self.tfinal}): tinit + tfinal must be less than the "
                f"run's {total_step} optimizer steps, or no step is left to re-allocate the rank budget in. "
                "Lower tinit / tfinal or train for more steps (with_training(max_steps=...))."
            )

    def to_peft_config(self, total_step: int | None = None) -> Any:
        """The ``peft.AdaLoraConfig``; ``total_step`` is the run's number of optimizer steps (train() sets it)."""
        from peft import AdaLoraConfig, TaskType

        if total_step is None:
            raise ConfigError(
                "AdaLoRA needs the run's number of optimizer steps: train() fills it in from the data and "
                "with_training(); pass to_peft_config(total_step=...) when building the PEFT config yourself."
            )
        self.check_steps(total_step)
        return AdaLoraConfig(
            task_type=TaskType.CAUSAL_LM,
            init_r=self.init_r,
            target_r=self.target_r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets if self.targets == "all-linear" else list(self.targets),
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.deltaT,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            total_step=total_step,
        )

    def meta_peft_config(self) -> Any:
        """The PEFT config for counting parameters on the meta device; the step count does not change shapes."""
        return self.to_peft_config(total_step=self.tinit + self.tfinal + 1)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"name": self.name, **data}

    def describe(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else ", ".join(self.targets)
        return (
            f"AdaLoRA init_r={self.init_r} target_r={self.target_r} alpha={self.alpha:g} dropout={self.dropout:g} "
            f"targets={targets} tinit={self.tinit} tfinal={self.tfinal} deltaT={self.deltaT} "
            f"orth_reg_weight={self.orth_reg_weight:g}"
        )


def rank_allocation_callback() -> Any:
    """A TrainerCallback that re-allocates the rank budget after every optimizer step.

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before ``zero_grad()``, where PEFT's
    ``AdaLoraModel.update_and_allocate`` must run: it reads the gradients to score each singular triplet.
    ``state.global_step`` there counts the steps finished before this one (0 first), as in PEFT's examples.
    """
    from transformers import TrainerCallback

    def adalora_model(model: Any) -> Any:
        adalora = getattr(model, "base_model", None)
        if adalora is None or not hasattr(adalora, "update_and_allocate"):
            raise ConfigError("AdaLoRA rank allocation: the trained model is not an AdaLoRA PeftModel.")
        return adalora

    class AdaLoraRankAllocation(TrainerCallback):
        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            # The schedule was set from lorakit's step count; the Trainer's own count is the truth.
            adalora = adalora_model(model)
            config = adalora.peft_config[adalora.trainable_adapter_name]
            if state.max_steps and state.max_steps != config.total_step:
                warnings.warn(
                    f"AdaLoRA: the run has {state.max_steps} optimizer steps, not the {config.total_step} lorakit "
                    "counted; the rank schedule uses the Trainer's count.",
                    stacklevel=2,
                )
                AdaLoraSpec(tinit=config.tinit, tfinal=config.tfinal).check_steps(state.max_steps)
                config.total_step = state.max_steps

        def on_optimizer_step(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            adalora_model(model).update_and_allocate(state.global_step)

    return AdaLoraRankAllocation()


def orth_regularization(model: Any) -> Any:
    """``orth_reg_weight`` times the mean orthogonality penalty of the adapter's singular vectors.

    PEFT's ``AdaLoraModel.forward`` adds this to ``outputs.loss``, but TRL's SFTTrainer computes its loss from the
    per-token log-probabilities and never reads ``outputs.loss``, so lorakit adds the same term to the loss.
    """
    import torch

    adalora = model.base_model
    adapter = adalora.trainable_adapter_name
    weight = adalora.peft_config[adapter].orth_reg_weight
    total, count = None, 0
    for name, param in adalora.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name and param.requires_grad:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None or weight == 0:
        return None
    return weight * total / count


def rank_pattern_sizes(rank_pattern: dict[str, Any]) -> dict[str, int]:
    """``{module: rank kept}`` from an AdaLoRA ``rank_pattern`` (a boolean mask per module)."""
    return {name: int(sum(bool(x) for x in mask)) for name, mask in rank_pattern.items()}

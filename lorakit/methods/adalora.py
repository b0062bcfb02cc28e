"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated during training (Zhang et al., 2023).

Each adapted linear layer starts with ``init_r`` singular triplets; between step ``tinit`` and step
``total_step - tfinal`` the least important triplets are masked until the average rank is ``target_r``, then the
remaining ones are fine-tuned. PEFT needs the run's ``total_step``: lorakit fills it in from the planned number of
optimizer steps when ``train()`` starts, and calls ``update_and_allocate`` after every optimizer step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, positive_int
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase, MethodContext
from lorakit.methods.lora import check_targets, to_targets

__all__ = ["AdaLoraSpec", "orth_regularization", "rank_allocation_callback", "rank_pattern_sizes"]


def _non_negative_int(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"with_adalora({attribute.name}={value!r}) must be an integer >= 0 (a number of steps)."
        )


@attrs.frozen
class AdaLoraSpec(MethodBase):
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

    @property
    def dropout_masks(self) -> bool:
        return self.dropout > 0

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

    needs_step_count: ClassVar[bool] = True

    def check_schedule(self, max_steps: int | None, source: Any) -> None:
        """At a builder call: the schedule must fit ``max_steps``, or the rows of ``source`` must be countable."""
        if max_steps is not None:
            self.check_steps(max_steps)
        elif source is not None and not (isinstance(source, (str, list)) or hasattr(source, "__len__")):
            raise ConfigError(
                f"with_adalora() needs the run's number of optimizer steps, and the rows of "
                f"{type(source).__name__} cannot be counted in advance. Set with_training(max_steps=...)."
            )

    def apply_on_meta(self, model: Any) -> Any:
        peft_model = super().apply_on_meta(model)
        for name, param in peft_model.named_parameters():
            if ".ranknum." in name:  # the rank constant; moving it to the meta device made it trainable
                param.requires_grad = False
        return peft_model

    def peft_config(self, context: MethodContext) -> Any:
        return self.to_peft_config(total_step=context.total_steps)

    def callbacks(self) -> list[Any]:
        return [rank_allocation_callback()]

    def extra_loss(self, model: Any) -> Any:
        return orth_regularization(model)

    @contextlib.contextmanager
    def saving(self, model: Any, *, checkpoint: bool) -> Iterator[None]:
        """Layers whose whole rank budget moved elsewhere are saved with rank 0; PEFT takes zero-sized tensors for
        unsharded ZeRO-3 / FSDP parameters and warns, wrongly here. A checkpoint keeps the full-size (masked)
        tensors, the exact training state, and the rank pattern goes into the resume state instead: PEFT would
        otherwise cut the tensors to the pattern, and a resumed run could not load them into its full-size layers.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
            config = (
                _adalora(model).peft_config[_adalora(model).trainable_adapter_name] if checkpoint else None
            )
            pattern = config.rank_pattern if config is not None else None
            if config is not None:
                config.rank_pattern = None
            try:
                yield
            finally:
                if config is not None:
                    config.rank_pattern = pattern

    def resume_state(self, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """PEFT's RankAllocator importance estimates (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``) and the current
        rank pattern: the budget re-allocation after a resume continues from them."""
        adalora = _adalora(model)
        allocator = adalora.rankallocator
        tensors = {
            f"{kind}/{name}": tensor.detach().to("cpu").contiguous()
            for kind in _IMPORTANCE
            for name, tensor in getattr(allocator, kind).items()
        }
        config = adalora.peft_config[adalora.trainable_adapter_name]
        return tensors, {"rank_pattern": config.rank_pattern}

    def load_resume_state(self, model: Any, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        adalora = _adalora(model)
        allocator = adalora.rankallocator
        devices = {name: param.device for name, param in adalora.model.named_parameters()}
        for kind in _IMPORTANCE:
            prefix = f"{kind}/"
            setattr(
                allocator,
                kind,
                {
                    key[len(prefix) :]: tensor.to(devices.get(key[len(prefix) :], tensor.device))
                    for key, tensor in tensors.items()
                    if key.startswith(prefix)
                },
            )
        adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = info.get("rank_pattern")

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


_IMPORTANCE = ("ipt", "exp_avg_ipt", "exp_avg_unc")
"""The RankAllocator's per-parameter importance dicts (PEFT ``peft.tuners.adalora.layer.RankAllocator``)."""


def _adalora(model: Any) -> Any:
    """The ``AdaLoraModel`` inside a PeftModel (it holds the rank allocator and the config)."""
    adalora = getattr(model, "base_model", None)
    if adalora is None or not hasattr(adalora, "update_and_allocate"):
        raise ConfigError("AdaLoRA rank allocation: the trained model is not an AdaLoRA PeftModel.")
    return adalora


def rank_allocation_callback() -> Any:
    """A TrainerCallback that re-allocates the rank budget after every optimizer step.

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before ``zero_grad()``, where PEFT's
    ``AdaLoraModel.update_and_allocate`` must run: it reads the gradients to score each singular triplet.
    ``state.global_step`` there counts the steps finished before this one (0 first), as in PEFT's examples.
    """
    from transformers import TrainerCallback

    class AdaLoraRankAllocation(TrainerCallback):
        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
        ) -> None:
            # The schedule was set from lorakit's step count; the Trainer's own count is the truth.
            adalora = _adalora(model)
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
            _adalora(model).update_and_allocate(state.global_step)

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

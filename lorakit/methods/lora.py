"""LoRA: trainable low-rank updates ``B @ A`` beside frozen linear weights (Hu et al., 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, one_of, positive_int
from lorakit.errors import ConfigError

__all__ = ["LoraSpec"]


def _to_targets(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@attrs.frozen
class LoraSpec:
    """LoRA hyper-parameters; ``to_peft_config()`` builds the ``peft.LoraConfig``."""

    name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True

    r: int = attrs.field(default=16, validator=positive_int("Typical ranks are 8-64."))
    """Rank of the update matrices."""
    alpha: float = attrs.field(default=32, validator=number_in(0, 1e6, low_open=True, fix="Typically 2 * r."))
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = attrs.field(default=0.05, validator=number_in(0.0, 1.0, high_open=True))
    """Dropout on the adapter input."""
    targets: str | tuple[str, ...] = attrs.field(default="all-linear", converter=_to_targets)
    """``"all-linear"`` (every linear layer but the output head) or a tuple of module names, e.g. ("q_proj", "v_proj")."""
    bias: str = attrs.field(default="none", validator=one_of(("none", "all", "lora_only")))
    """Which biases to train."""

    @targets.validator
    def _check_targets(self, attribute: attrs.Attribute, value: Any) -> None:
        if value == "all-linear":
            return
        if isinstance(value, str):
            raise ConfigError(
                f"`targets` must be 'all-linear' or a tuple of module names, got {value!r}. "
                f"For one module write targets=({value!r},)."
            )
        if not isinstance(value, tuple) or not value or not all(isinstance(t, str) and t for t in value):
            raise ConfigError(
                f"`targets` must be 'all-linear' or a non-empty tuple of module names, got {value!r}. "
                "Example: targets=('q_proj', 'v_proj')."
            )

    def to_peft_config(self) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets if self.targets == "all-linear" else list(self.targets),
            bias=self.bias,
        )

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"name": self.name, **data}

    def describe(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else ", ".join(self.targets)
        return f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} targets={targets} bias={self.bias}"

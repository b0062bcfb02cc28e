"""IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al., 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import to_names
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase

__all__ = ["Ia3Spec"]


def _check_names(label: str) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, tuple) or not value or not all(isinstance(t, str) and t for t in value):
            raise ConfigError(
                f"with_ia3({attribute.name}={value!r}) must be a non-empty tuple of module names, "
                f"e.g. {label}, or None for PEFT's defaults for the architecture."
            )

    return check


@attrs.frozen
class Ia3Spec(MethodBase):
    """IA3 options; ``to_peft_config()`` builds the ``peft.IA3Config``."""

    name: ClassVar[str] = "ia3"
    mergeable: ClassVar[bool] = True

    targets: tuple[str, ...] | None = attrs.field(
        default=None, converter=to_names, validator=_check_names("('k_proj', 'v_proj', 'down_proj')")
    )
    """Modules whose activations are rescaled; ``None`` uses PEFT's defaults (keys, values, down projection)."""
    feedforward: tuple[str, ...] | None = attrs.field(
        default=None, converter=to_names, validator=_check_names("('down_proj',)")
    )
    """Which of ``targets`` are feed-forward layers (their input is scaled, not their output)."""

    @feedforward.validator
    def _check_subset(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if self.targets is None or not set(value) <= set(self.targets):
            raise ConfigError(
                f"with_ia3(feedforward={value!r}) must be a subset of targets={self.targets!r}; "
                "name the feed-forward modules in targets too."
            )

    def to_peft_config(self) -> Any:
        from peft import IA3Config, TaskType

        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=list(self.targets) if self.targets is not None else None,
            feedforward_modules=list(self.feedforward) if self.feedforward is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "targets": list(self.targets) if self.targets is not None else None,
            "feedforward": list(self.feedforward) if self.feedforward is not None else None,
        }

    def describe(self) -> str:
        targets = ", ".join(self.targets) if self.targets is not None else "PEFT defaults"
        return f"IA3 targets={targets}"

"""Prompt tuning: trainable virtual-token embeddings prepended to every input (Lester et al., 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import positive_int

__all__ = ["PromptTuningSpec"]


@attrs.frozen
class PromptTuningSpec:
    """Prompt-tuning options; ``to_peft_config()`` builds the ``peft.PromptTuningConfig``.

    Prompt-based adapters cannot be merged into the base weights: serve them unmerged.
    """

    name: ClassVar[str] = "prompt_tuning"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = attrs.field(default=20, validator=positive_int("Typical values are 8-100."))
    """How many virtual tokens are learned and prepended."""

    def to_peft_config(self) -> Any:
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_virtual_tokens": self.num_virtual_tokens}

    def describe(self) -> str:
        return f"prompt tuning num_virtual_tokens={self.num_virtual_tokens}"

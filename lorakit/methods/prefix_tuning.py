"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): trained key/value prefixes in every layer.

Both learn ``num_virtual_tokens`` keys and values per attention layer, handed to the model as a
``past_key_values`` cache. P-tuning v2 ("deep prompt tuning") is prefix tuning with the reparameterisation
encoder: an MLP maps small learned embeddings to the per-layer prefixes, which trains more stably; only the
resulting prefixes are saved.

Prefix methods cannot be combined with gradient checkpointing (PEFT's prefix cache and the recomputed forward
disagree on sequence lengths): lorakit turns automatic checkpointing off for them and refuses an explicit
``with_training(grad_checkpointing=True)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import optional_positive_int, positive_int
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase

__all__ = ["PrefixTuningSpec", "PtuningV2Spec"]


def _check_bool(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"`{attribute.name}` must be True or False, got {value!r}.")


def _prefix_config(num_virtual_tokens: int, projection: bool, encoder_hidden_size: int | None) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=projection,
        encoder_hidden_size=encoder_hidden_size,
    )


@attrs.frozen
class PrefixTuningSpec(MethodBase):
    """Prefix-tuning options; ``to_peft_config()`` builds the ``peft.PrefixTuningConfig``.

    Prompt-based adapters cannot be merged into the base weights: serve them unmerged.
    """

    name: ClassVar[str] = "prefix_tuning"
    mergeable: ClassVar[bool] = False
    supports_grad_checkpointing: ClassVar[bool] = False
    virtual_tokens: ClassVar[bool] = True

    num_virtual_tokens: int = attrs.field(default=20, validator=positive_int("Typical values are 8-100."))
    """How many key/value prefix positions are learned per layer."""
    projection: bool = attrs.field(default=False, validator=_check_bool)
    """Produce the prefixes with a 2-layer MLP (the reparameterisation of the paper) instead of learning them
    directly; ``True`` is what :class:`PtuningV2Spec` does."""
    encoder_hidden_size: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None for the model's hidden size.")
    )
    """Hidden size of the projection MLP (``projection=True`` only); ``None`` uses the model's hidden size."""

    def __attrs_post_init__(self) -> None:
        if self.encoder_hidden_size is not None and not self.projection:
            raise ConfigError(
                f"with_prefix_tuning(encoder_hidden_size={self.encoder_hidden_size}) sizes the projection MLP, "
                "but projection=False. Pass projection=True (or use with_ptuning_v2()), or drop "
                "encoder_hidden_size."
            )

    def to_peft_config(self) -> Any:
        return _prefix_config(self.num_virtual_tokens, self.projection, self.encoder_hidden_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_virtual_tokens": self.num_virtual_tokens,
            "projection": self.projection,
            "encoder_hidden_size": self.encoder_hidden_size,
        }

    def describe(self) -> str:
        text = f"prefix tuning num_virtual_tokens={self.num_virtual_tokens}"
        if self.projection:
            size = self.encoder_hidden_size if self.encoder_hidden_size is not None else "model hidden size"
            text += f" projection encoder_hidden_size={size}"
        return text


@attrs.frozen
class PtuningV2Spec(MethodBase):
    """P-tuning v2 (deep prompt tuning): prefix tuning with the reparameterisation MLP (``prefix_projection``).

    Prompt-based adapters cannot be merged into the base weights: serve them unmerged.
    """

    name: ClassVar[str] = "ptuning_v2"
    mergeable: ClassVar[bool] = False
    supports_grad_checkpointing: ClassVar[bool] = False
    virtual_tokens: ClassVar[bool] = True

    num_virtual_tokens: int = attrs.field(default=20, validator=positive_int("Typical values are 8-100."))
    """How many key/value prefix positions are learned per layer."""
    encoder_hidden_size: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None for the model's hidden size.")
    )
    """Hidden size of the reparameterisation MLP; ``None`` uses the model's hidden size."""

    def to_peft_config(self) -> Any:
        return _prefix_config(self.num_virtual_tokens, True, self.encoder_hidden_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_virtual_tokens": self.num_virtual_tokens,
            "encoder_hidden_size": self.encoder_hidden_size,
        }

    def describe(self) -> str:
        size = self.encoder_hidden_size if self.encoder_hidden_size is not None else "model hidden size"
        return f"P-tuning v2 (deep prompt tuning) num_virtual_tokens={self.num_virtual_tokens} encoder_hidden_size={size}"

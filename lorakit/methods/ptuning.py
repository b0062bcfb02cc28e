"""P-tuning (v1): virtual-token embeddings produced by a small trainable encoder (Liu et al., 2021).

Like prompt tuning the virtual tokens are prepended to the input embeddings, but they are the output of an
MLP or LSTM over learned inputs, which trains more stably. Only the encoder's outputs are saved with the
adapter: the encoder is a training-time reparameterisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, one_of, positive_int
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase

__all__ = ["PtuningSpec"]

ENCODER_TYPES = ("mlp", "lstm")


@attrs.frozen
class PtuningSpec(MethodBase):
    """P-tuning options; ``to_peft_config()`` builds the ``peft.PromptEncoderConfig``.

    Prompt-based adapters cannot be merged into the base weights: serve them unmerged.
    """

    name: ClassVar[str] = "ptuning"
    mergeable: ClassVar[bool] = False
    virtual_tokens: ClassVar[bool] = True

    num_virtual_tokens: int = attrs.field(default=20, validator=positive_int("Typical values are 8-100."))
    """How many virtual tokens are learned and prepended."""
    encoder_hidden_size: int = attrs.field(
        default=128, validator=positive_int("Typical values are 128-1024.")
    )
    """Hidden size of the prompt encoder."""
    encoder_type: str = attrs.field(
        default="mlp", validator=one_of(ENCODER_TYPES, "'mlp' is PEFT's recommended default.")
    )
    """``"mlp"`` (a 3-layer MLP) or ``"lstm"`` (a bidirectional LSTM followed by a 2-layer MLP)."""
    encoder_num_layers: int = attrs.field(default=2, validator=positive_int("Typical values are 1-2."))
    """LSTM layers (``encoder_type="lstm"`` only; the MLP always has the same shape)."""
    encoder_dropout: float = attrs.field(default=0.0, validator=number_in(0.0, 1.0, high_open=True))
    """Dropout between LSTM layers (``encoder_type="lstm"`` with ``encoder_num_layers > 1`` only)."""

    def __attrs_post_init__(self) -> None:
        if self.encoder_type == "mlp" and (self.encoder_num_layers != 2 or self.encoder_dropout != 0.0):
            raise ConfigError(
                f"with_ptuning(encoder_num_layers={self.encoder_num_layers}, "
                f"encoder_dropout={self.encoder_dropout}) only apply to encoder_type='lstm'; the MLP encoder "
                "has a fixed shape and no dropout. Use encoder_type='lstm' or drop those options."
            )
        if self.encoder_type == "lstm" and self.encoder_dropout > 0 and self.encoder_num_layers == 1:
            raise ConfigError(
                f"with_ptuning(encoder_dropout={self.encoder_dropout}) acts between LSTM layers, but "
                "encoder_num_layers=1. Use encoder_num_layers >= 2 or encoder_dropout=0.0."
            )

    def to_peft_config(self) -> Any:
        from peft import PromptEncoderConfig, TaskType

        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.num_virtual_tokens,
            encoder_hidden_size=self.encoder_hidden_size,
            encoder_reparameterization_type=self.encoder_type.upper(),
            encoder_num_layers=self.encoder_num_layers,
            encoder_dropout=self.encoder_dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_virtual_tokens": self.num_virtual_tokens,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_type": self.encoder_type,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    def describe(self) -> str:
        text = (
            f"P-tuning num_virtual_tokens={self.num_virtual_tokens} encoder={self.encoder_type} "
            f"encoder_hidden_size={self.encoder_hidden_size}"
        )
        if self.encoder_type == "lstm":
            text += f" encoder_num_layers={self.encoder_num_layers} encoder_dropout={self.encoder_dropout}"
        return text

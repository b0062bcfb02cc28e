"""Prompt tuning: trainable virtual-token embeddings prepended to every input (Lester et al., 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import positive_int
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase, MethodContext

__all__ = ["PromptTuningSpec"]


def _check_text(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(
            f"with_prompt_tuning(init_text={value!r}) must be a non-empty string, e.g. "
            "'Classify the sentiment of this review:', or None for a random initialisation."
        )


@attrs.frozen
class PromptTuningSpec(MethodBase):
    """Prompt-tuning options; ``to_peft_config()`` builds the ``peft.PromptTuningConfig``.

    Prompt-based adapters cannot be merged into the base weights: serve them unmerged.
    """

    name: ClassVar[str] = "prompt_tuning"
    mergeable: ClassVar[bool] = False
    virtual_tokens: ClassVar[bool] = True

    num_virtual_tokens: int = attrs.field(default=20, validator=positive_int("Typical values are 8-100."))
    """How many virtual tokens are learned and prepended."""
    init_text: str | None = attrs.field(default=None, validator=_check_text)
    """Start the virtual tokens at the embeddings of this text's tokens (PEFT ``PromptTuningInit.TEXT``:
    repeated or cut to ``num_virtual_tokens``); ``None`` starts them at random."""

    @property
    def needs_tokenizer(self) -> bool:
        """Whether :meth:`to_peft_config` needs the base model's tokenizer (to tokenize ``init_text``)."""
        return self.init_text is not None

    def peft_config(self, context: MethodContext) -> Any:
        """The PEFT config; ``init_text`` is tokenized with the base model's tokenizer."""
        if self.needs_tokenizer:
            return self.to_peft_config(
                tokenizer_path=context.base_path, tokenizer_kwargs=context.tokenizer_kwargs
            )
        return self.to_peft_config()

    def to_peft_config(
        self, tokenizer_path: str | None = None, tokenizer_kwargs: dict[str, Any] | None = None
    ) -> Any:
        """The PEFT config; with ``init_text`` it needs the base model's tokenizer path (the pipeline passes it).

        PEFT loads that tokenizer with ``AutoTokenizer.from_pretrained(tokenizer_path, **tokenizer_kwargs)``
        when the adapter is created (not when it is reloaded), so a local model directory works offline.
        """
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        if self.init_text is None:
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens
            )
        if tokenizer_path is None:
            raise ConfigError(
                "with_prompt_tuning(init_text=...) needs the base model's tokenizer to embed the text; "
                "call PromptTuningSpec.to_peft_config(tokenizer_path=<model dir>) (Pipeline.train() does)."
            )
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=self.init_text,
            tokenizer_name_or_path=tokenizer_path,
            tokenizer_kwargs=dict(tokenizer_kwargs) if tokenizer_kwargs else None,
        )

    def meta_peft_config(self) -> Any:
        """A config with the same parameter shapes for the meta-device plan (no tokenizer load)."""
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.num_virtual_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_virtual_tokens": self.num_virtual_tokens, "init_text": self.init_text}

    def describe(self) -> str:
        text = f"prompt tuning num_virtual_tokens={self.num_virtual_tokens}"
        if self.init_text is not None:
            text += f" init_text={self.init_text!r}"
        return text

"""Hook defaults every adapter method spec inherits; a method overrides only what is specific to it.

The trainer (:mod:`lorakit.trainer`), ``train()`` (:mod:`lorakit.training`), the plan (:mod:`lorakit.plan`) and
the builder (:mod:`lorakit.pipeline`) call these hooks and never ask which method a spec is. The hook Protocol
is documented in :mod:`lorakit.methods`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs

__all__ = ["MethodBase", "MethodContext", "RESUME_HOOKS"]


@attrs.frozen
class MethodContext:
    """What a method's hooks may need from the run being trained."""

    base_path: str
    """The base model's local directory or Hub id (:func:`lorakit.models.resolve_model_path`)."""
    revision: str | None = None
    """The base model's revision, if pinned."""
    tokenizer_kwargs: dict[str, Any] = attrs.field(factory=dict)
    """What PEFT passes to ``AutoTokenizer.from_pretrained`` when a method tokenizes text (prompt tuning)."""
    total_steps: int | None = None
    """The run's planned number of optimizer steps (AdaLoRA's schedule needs it)."""
    resuming: bool = False
    """True when the run continues from a checkpoint (its weights then come from the checkpoint)."""


RESUME_HOOKS = ("resume_state", "load_resume_state")
"""The hooks that carry a method's own training state through a checkpoint."""


class MethodBase:
    """Default hooks: a PEFT adapter built from ``to_peft_config()``, nothing else to prepare, save or resume.

    Plan-side hooks (the builder and :mod:`lorakit.plan` call them) come first, train-side hooks after.
    """

    __slots__ = ()

    name: ClassVar[str]
    has_adapter: ClassVar[bool] = True
    """False when the method trains the model's own weights (full fine-tuning): no PEFT adapter, nothing to merge."""
    needs_step_count: ClassVar[bool] = False
    """True when the PEFT config needs the run's number of optimizer steps before training (AdaLoRA)."""
    supports_grad_checkpointing: ClassVar[bool] = True
    """False for methods that cannot train with gradient checkpointing (prefix methods)."""
    virtual_tokens: ClassVar[bool] = False
    """True for prompt-learning methods, which prepend learned virtual tokens: the fused loss does not apply."""

    @property
    def dropout_masks(self) -> bool:
        """True when the adapter draws a dropout mask over the input of each adapted layer (LoRA dropout > 0)."""
        return False

    @property
    def frozen_weights_bf16_ok(self) -> bool:
        """Whether the frozen base weights may be stored in bf16 under CPU bf16 autocast, which multiplies them in
        bf16 anyway (:func:`lorakit.memory.decide_frozen_bf16`). Not for methods that read the base weight in fp32
        beside the matmul (DoRA's weight norm) or train the model's own weights."""
        return self.has_adapter

    def to_peft_config(self) -> Any:  # pragma: no cover - every method defines it
        raise NotImplementedError

    # --- plan side ------------------------------------------------------------------------------------------

    def builder_call(self) -> str:
        """The builder call that chose this method, for messages (``"with_lora()"``)."""
        return f"with_{self.name}()"

    def check_quantization(self, quant: Any, *, final: bool) -> None:
        """Raise ConfigError when the method cannot train on this quantization (``None``: no quantization).

        ``final`` is True once the pipeline is complete (``train()``, ``plan()``, a config file); before that a
        missing quantization may still be added by a later builder call.
        """

    def check_steps(self, total_steps: int) -> None:
        """Raise ConfigError when the run's ``total_steps`` optimizer steps cannot fit the method's schedule."""

    def check_schedule(self, max_steps: int | None, source: Any) -> None:
        """At a builder call: raise ConfigError when the run's length cannot fit the method's schedule
        (``max_steps`` from with_training(), ``source`` the data source or ``None``)."""

    def meta_peft_config(self) -> Any:
        """The PEFT config used on the meta device (parameter counting); the shapes must equal training's."""
        return self.to_peft_config()

    def apply_on_meta(self, model: Any) -> Any:
        """``model`` (built on the meta device) with the method applied, as training will apply it."""
        from peft import get_peft_model

        return get_peft_model(model, self.meta_peft_config())

    def plan_targets(self, model: Any) -> tuple[str, ...]:
        """The module names the plan lists as targets of ``model`` (what :meth:`apply_on_meta` returned)."""
        targeted = getattr(model, "targeted_module_names", None) or []  # prompt-based methods target none
        return tuple(sorted({name.rsplit(".", 1)[-1] for name in targeted}))

    def base_of(self, model: Any) -> Any:
        """The plain transformers model inside ``model`` (what :meth:`apply_on_meta` returned)."""
        return model.get_base_model()

    # --- train side -----------------------------------------------------------------------------------------

    def check_run(self, context: MethodContext) -> None:
        """Raise ConfigError for what cannot work with this base model, before any weights load."""

    def peft_config(self, context: MethodContext) -> Any:
        """The PEFT config of this run (``None``: no adapter, the trainer trains the model itself)."""
        return self.to_peft_config()

    def prepare_model(self, model: Any) -> Any:
        """The loaded base model prepared for the trainer (before the adapter is added); returns it."""
        return model

    def setup_trainer(self, trainer: Any, context: MethodContext) -> None:
        """Adjust the built trainer and its (PEFT) model before training starts."""

    def callbacks(self) -> list[Any]:
        """``TrainerCallback`` objects the method needs during training."""
        return []

    def extra_loss(self, model: Any) -> Any:
        """A loss term added to every training micro-batch's loss (``None``: nothing); ``model`` is unwrapped."""
        return None

    @contextlib.contextmanager
    def saving(self, model: Any, *, checkpoint: bool) -> Iterator[None]:
        """Context around saving ``model`` (``checkpoint=True``: into a checkpoint, else the final run)."""
        yield

    def resume_state(self, model: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """State the method keeps outside the model weights, saved into every checkpoint: ``(tensors, info)``
        with ``tensors`` a flat ``{name: torch.Tensor}`` (saved as safetensors) and ``info`` JSON-able; None when
        there is none."""
        return None

    def load_resume_state(self, model: Any, tensors: dict[str, Any], info: dict[str, Any]) -> None:
        """Restore what :meth:`resume_state` saved, after the checkpoint's weights were loaded."""

"""LoRA: trainable low-rank updates ``B @ A`` beside frozen linear weights (Hu et al., 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, one_of, positive_int
from lorakit.errors import ConfigError

__all__ = ["LoraSpec"]


def to_targets(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


INITS = ("default", "gaussian", "pissa", "olora")


def _to_layers(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _to_names(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def check_targets(value: Any) -> None:
    """``targets`` is ``"all-linear"`` or a non-empty tuple of module names (shared by LoRA and AdaLoRA)."""
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
    targets: str | tuple[str, ...] = attrs.field(default="all-linear", converter=to_targets)
    """``"all-linear"`` (every linear layer but the output head) or a tuple of module names, e.g. ("q_proj", "v_proj")."""
    bias: str = attrs.field(default="none", validator=one_of(("none", "all", "lora_only")))
    """Which biases to train."""
    use_dora: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """DoRA: split each update into magnitude and direction (Liu et al., 2024)."""
    use_rslora: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """rsLoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``, stable at high ranks."""
    init: str = attrs.field(default="default")
    """Adapter initialisation: "default" (zero B, Kaiming A), "gaussian", "pissa" or "olora"."""
    layers: tuple[int, ...] | None = attrs.field(default=None, converter=_to_layers)
    """Only adapt these decoder layer indices, e.g. (10, 11); ``None`` adapts every layer."""
    modules_to_save: tuple[str, ...] | None = attrs.field(default=None, converter=_to_names)
    """Extra modules trained in full and saved with the adapter, e.g. ("lm_head",)."""

    @init.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
        if value == "loftq":
            raise ConfigError(
                "with_lora(init='loftq') is not supported: LoftQ needs the full-precision base to quantize "
                "itself and lorakit cannot yet run that step. Use init='pissa' (also SVD-based) or "
                "quantize_4bit() with the default init."
            )
        if value not in INITS:
            raise ConfigError(
                f"with_lora(init={value!r}) is not a known initialisation; use one of "
                + ", ".join(repr(i) for i in INITS)
                + "."
            )

    @layers.validator
    def _check_layers(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ConfigError(
                f"with_lora(layers={value!r}) must be a non-empty tuple of layer indices >= 0, e.g. (10, 11)."
            )

    @targets.validator
    def _check_targets(self, attribute: attrs.Attribute, value: Any) -> None:
        check_targets(value)

    def __attrs_post_init__(self) -> None:
        if self.layers is not None and self.targets == "all-linear":
            raise ConfigError(
                f"with_lora(layers={self.layers!r}) needs explicit module names: PEFT cannot restrict "
                "targets='all-linear' to some layers. Pass e.g. targets=('q_proj', 'k_proj', 'v_proj', 'o_proj')."
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
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights=True if self.init == "default" else self.init,
            layers_to_transform=list(self.layers) if self.layers is not None else None,
            modules_to_save=list(self.modules_to_save) if self.modules_to_save is not None else None,
        )

    def meta_peft_config(self) -> Any:
        """The PEFT config for counting parameters on the meta device: SVD-based inits need real weights,
        and the initialisation does not change the parameter shapes."""
        return attrs.evolve(self, init="default").to_peft_config()

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        for key in ("layers", "modules_to_save"):
            data[key] = list(data[key]) if data[key] is not None else None
        return {"name": self.name, **data}

    def describe(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else ", ".join(self.targets)
        text = f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} targets={targets} bias={self.bias}"
        extras = [flag for flag, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on]
        if self.init != "default":
            extras.append(f"init={self.init}")
        if self.layers is not None:
            extras.append("layers=" + ",".join(map(str, self.layers)))
        if self.modules_to_save is not None:
            extras.append("modules_to_save=" + ",".join(self.modules_to_save))
        return " ".join([text, *extras])

"""LoRA: trainable low-rank updates ``B @ A`` beside frozen linear weights (Hu et al., 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from lorakit.config import number_in, one_of, positive_int, to_names
from lorakit.errors import ConfigError
from lorakit.methods.base import MethodBase, MethodContext

__all__ = ["LoraSpec", "apply_loftq", "loftq_weights_dir"]


def to_targets(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


INITS = ("default", "gaussian", "pissa", "olora", "loftq")


def _to_layers(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
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
class LoraSpec(MethodBase):
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
    """Adapter initialisation: "default" (zero B, Kaiming A), "gaussian", "pissa", "olora" or "loftq" (needs
    quantize_4bit() and safetensors base weights: A, B start as the best rank-r fit of the quantization error)."""
    layers: tuple[int, ...] | None = attrs.field(default=None, converter=_to_layers)
    """Only adapt these decoder layer indices, e.g. (10, 11); ``None`` adapts every layer."""
    modules_to_save: tuple[str, ...] | None = attrs.field(default=None, converter=to_names)
    """Extra modules trained in full and saved with the adapter, e.g. ("lm_head",)."""

    @init.validator
    def _check_init(self, attribute: attrs.Attribute, value: Any) -> None:
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
        if self.init == "loftq" and self.use_dora:
            raise ConfigError(
                "with_lora(init='loftq', use_dora=True) is not supported: LoftQ fits B @ A to the quantization "
                "error, and DoRA's magnitude vector, computed before that, would rescale it. Use use_dora=False "
                "with init='loftq', or the default init with DoRA."
            )
        if self.layers is not None and self.targets == "all-linear":
            raise ConfigError(
                f"with_lora(layers={self.layers!r}) needs explicit module names: PEFT cannot restrict "
                "targets='all-linear' to some layers. Pass e.g. targets=('q_proj', 'k_proj', 'v_proj', 'o_proj')."
            )

    @property
    def dropout_masks(self) -> bool:
        return self.dropout > 0

    @property
    def frozen_weights_bf16_ok(self) -> bool:
        return not self.use_dora  # DoRA's magnitude divides by the norm of the fp32 base weight

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
            # LoftQ starts from normal LoRA layers; training replaces A and B (see apply_loftq).
            init_lora_weights=True if self.init in ("default", "loftq") else self.init,
            layers_to_transform=list(self.layers) if self.layers is not None else None,
            modules_to_save=list(self.modules_to_save) if self.modules_to_save is not None else None,
        )

    def meta_peft_config(self) -> Any:
        """The PEFT config for counting parameters on the meta device: SVD-based inits need real weights,
        and the initialisation does not change the parameter shapes."""
        return attrs.evolve(self, init="default").to_peft_config()

    def check_quantization(self, quant: Any, *, final: bool) -> None:
        """LoftQ fits the adapter to the error of bitsandbytes 4-bit quantization, so it needs quantize_4bit()."""
        if self.init != "loftq":
            return
        if quant is not None and quant.bits != 4:
            raise ConfigError(
                f"with_lora(init='loftq') cannot be combined with {quant.method_name}: LoftQ fits the adapter to "
                "the error of 4-bit quantization. Use quantize_4bit() instead, or another init with quantize_8bit()."
            )
        if quant is None and final:
            raise ConfigError(
                "with_lora(init='loftq') needs quantize_4bit(): LoftQ fits the adapter to the error of the 4-bit "
                "quantized base. Add .quantize_4bit(), or use init='pissa' / the default init without quantization."
            )

    def check_run(self, context: MethodContext) -> None:
        """LoftQ reads the full-precision weights from safetensors: refuse a base without them before any load."""
        if self.init == "loftq":
            loftq_weights_dir(context.base_path, context.revision)

    def setup_trainer(self, trainer: Any, context: MethodContext) -> None:
        """LoftQ: A, B start as the rank-r fit of W - Q(W), W read from the safetensors (a resume loads them)."""
        if self.init == "loftq" and not context.resuming:
            apply_loftq(trainer.model, loftq_weights_dir(context.base_path, context.revision))

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


def apply_loftq(peft_model: Any, model_path: str, adapter_name: str = "default") -> int:
    """LoftQ (Li et al., 2023): set each 4-bit LoRA layer's ``A``, ``B`` so that ``Q(W) + scale * B @ A`` is the
    best rank-r approximation of the full-precision ``W`` read from ``model_path``; returns the layers changed.

    This is PEFT's ``replace_lora_weights_loftq`` (same safetensors loader, same SVD split) with two fixes: it
    computes on the weights' device (PEFT's moves them to CUDA, so it fails on CPU), and it divides the factors
    by ``sqrt(scale)``. PEFT ignores LoRA's ``alpha / r`` scaling, so with ``alpha = 2 r`` its start adds twice
    the fitted error and is no closer to ``W`` than ``Q(W)`` alone.

    ``model_path`` is a ``.safetensors`` file or a directory holding ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``.
    """
    import math

    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(peft_model, str(model_path))
    prefix = "base_model.model."
    changed = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
                continue
            if not name.startswith(prefix):
                raise TypeError(f"apply_loftq() needs a PeftModel; module {name!r} is not under {prefix!r}.")
            weight = module.get_base_layer().weight
            full = loader.get_tensor(name[len(prefix) :] + ".weight").to(
                device=weight.device, dtype=torch.float32
            )
            quantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
            parts = _low_rank_decomposition(full - quantized, reduced_rank=module.r[adapter_name])
            root = math.sqrt(module.scaling[adapter_name])
            lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            lora_a.data = (parts["R"] / root).to(lora_a.dtype).contiguous()
            lora_b.data = (parts["L"] / root).to(lora_b.dtype).contiguous()
            changed += 1
    if not changed:
        raise ConfigError(
            "with_lora(init='loftq') found no 4-bit LoRA layer to initialise; LoftQ needs quantize_4bit() and "
            "LoRA targets among the quantized linear layers."
        )
    return changed


def loftq_weights_dir(base_path: str, revision: str | None = None) -> str:
    """The local directory with the base's full-precision safetensors weights that LoftQ reads.

    ``base_path`` is what :func:`lorakit.models.resolve_model_path` returned: a directory, or a Hub id looked up
    in the local Hugging Face cache only. Raises ConfigError naming the directory when the weights are missing.
    """
    from pathlib import Path

    path = Path(base_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(base_path, revision=revision, local_files_only=True))
        except Exception as error:
            raise ConfigError(
                f"with_lora(init='loftq') reads the full-precision weights of {base_path!r} from a local "
                f"safetensors file, and the model is not in the local cache ({error}). Download it, or pass "
                "from_model() a local directory."
            ) from error
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise ConfigError(
            f"with_lora(init='loftq') needs the base's full-precision weights as safetensors, and {str(path)!r} "
            "has neither model.safetensors nor model.safetensors.index.json. Re-save the model with "
            "save_pretrained(path, safe_serialization=True) and point from_model() at it."
        )
    return str(path)

"""Loading base models and tokenizers: local directories, Hub ids and embedded aliases.

Everything here imports torch / transformers lazily; :mod:`lorakit` itself stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit import embedded
from lorakit.config import ModelSpec, QuantSpec
from lorakit.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "cpu_has_native_bf16",
    "device_kind",
    "load_base_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_model_path",
    "resolve_precision",
    "torch_dtype",
]

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def device_kind() -> str:
    """``"cuda"`` when a CUDA GPU is usable, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str) -> str:
    """Turn ``"auto"`` into ``"bf16"``/``"fp16"`` on a GPU and ``"fp32"`` on CPU; check explicit requests."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and not cuda and cpu_has_native_bf16():
        return "bf16"  # fp32 weights, bf16 autocast (see docs/benchmarks.md)
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(
            f"with_training(precision={precision!r}) needs a CUDA GPU"
            + (" (or, for bf16, a CPU with native bf16: AVX512-BF16 or AMX)" if precision == "bf16" else "")
            + " and none is available. Use precision='auto' (fp32 on CPU)."
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "with_training(precision='bf16'): this GPU has no bf16 support. Use precision='fp16'."
        )
    return precision


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX), so bf16 autocast can pay on it."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ... -> ``torch.bfloat16``."""
    import torch

    return getattr(torch, _DTYPE_NAMES[name])


def resolve_model_path(spec: ModelSpec) -> str:
    """The directory or Hub id transformers loads: embedded aliases become their cached safetensors copy."""
    if embedded.is_embedded(spec.name_or_path):
        return str(embedded.embedded_model_dir(spec.name_or_path))
    path = Path(spec.name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"from_model({spec.name_or_path!r}): the directory has no config.json. "
                "Point at a transformers model directory (what save_pretrained writes)."
            )
        return str(path)
    if spec.name_or_path.startswith((".", "/", "~")):  # clearly a path, not a Hub id
        raise ConfigError(f"from_model({spec.name_or_path!r}): no such directory.")
    return spec.name_or_path  # a Hub id


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    return kwargs


def _explain_load_error(spec: ModelSpec, error: Exception) -> ConfigError:
    return ConfigError(
        f"Could not load model {spec.name_or_path!r}: {error}. It is neither a local model directory nor an "
        "embedded alias ('smollm2-135m'); a Hub id needs network access (or a local copy in the HF cache)."
    )


def load_model_config(spec: ModelSpec) -> Any:
    """The model's ``PretrainedConfig`` without loading any weights."""
    from transformers import AutoConfig

    if embedded.is_embedded(spec.name_or_path):
        cached = embedded.cached_model_dir(spec.name_or_path)
        if cached is not None:
            return AutoConfig.from_pretrained(cached)
        gguf = embedded.gguf_path(spec.name_or_path)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config
    try:
        return AutoConfig.from_pretrained(resolve_model_path(spec), **_hub_kwargs(spec))
    except (OSError, ValueError) as error:
        raise _explain_load_error(spec, error) from error


def load_tokenizer(path: str, spec: ModelSpec) -> Any:
    """Load the tokenizer and make sure it can pad.

    With no pad token the EOS token pads. That is safe in lorakit: labels are built per example before
    batching and the collator pads labels with -100 by *position*, so a real EOS is still trained.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(spec))
    except (OSError, ValueError) as error:
        raise _explain_load_error(spec, error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"The tokenizer of {spec.name_or_path!r} has neither a pad nor an EOS token; "
                "lorakit needs an EOS token to teach the model to stop. Set tokenizer.eos_token and save it."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: QuantSpec, compute_dtype: torch.dtype, quant_storage: str | None = None) -> Any:
    """The ``BitsAndBytesConfig`` for a quantization spec (``quant_storage``: 4-bit storage dtype, for FSDP)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"{quant.method_name} needs bitsandbytes: pip install 'lorakit[qlora]'"
        ) from error
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype) if quant.compute_dtype else compute_dtype,
        **({"bnb_4bit_quant_storage": torch_dtype(quant_storage)} if quant_storage else {}),
    )


def load_base_model(
    path: str,
    spec: ModelSpec,
    *,
    dtype: torch.dtype,
    quant: QuantSpec | None = None,
    quant_storage: str | None = None,
) -> Any:
    """Load the causal LM in ``dtype`` (or quantized with bitsandbytes) on the training device.

    ``quant_storage`` stores 4-bit weights in that dtype so FSDP / ZeRO-3 can shard them (QLoRA on many GPUs).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, **_hub_kwargs(spec)}
    if spec.dtype != "auto":
        kwargs["dtype"] = torch_dtype(spec.dtype)
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant, kwargs["dtype"], quant_storage)
        kwargs["device_map"] = {"": 0} if device_kind() == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        if isinstance(error, ValueError) and "quantiz" in str(error).lower():
            raise
        raise _explain_load_error(spec, error) from error
    if quant is not None and quant.bits == 4:
        disable_cpu_4bit_repacking(model)
    return model


def disable_cpu_4bit_repacking(model: Any) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, one no-grad eval forward of a ``Linear4bit`` repacks its weight in place; LoRA
    gradients through the repacked layers are then wrong, so a run with evaluation would train differently from
    the same run without it. Evaluation must never change training, so the repacking is switched off.
    Returns the number of layers changed.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count

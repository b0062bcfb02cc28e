"""Loading base models and tokenizers: local directories, Hub ids and embedded aliases.

Everything here imports torch / transformers lazily; :mod:`lorakit` itself stays light.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit import embedded
from lorakit.config import ModelSpec, QuantSpec
from lorakit.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeviceInfo",
    "PrecisionDecision",
    "cpu_has_native_bf16",
    "current_device",
    "check_model_options",
    "decide_attention",
    "decide_precision",
    "device_kind",
    "inference_placement",
    "load_base_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_model_path",
    "resolve_precision",
    "hidden_size_of",
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


@attrs.frozen
class DeviceInfo:
    """The device a run would use, as the precision and fast-path decisions see it (tests pass simulated ones)."""

    kind: str
    """``"cuda"`` or ``"cpu"``."""
    name: str
    """The GPU's name (``"Tesla T4"``) or ``"CPU"``."""
    capability: tuple[int, int] | None = None
    """CUDA compute capability (``(7, 5)`` on a T4, ``(8, 0)`` on an A100); None on CPU."""
    total_memory: int | None = None
    """Bytes of GPU memory; None on CPU."""
    native_bf16: bool = False
    """bf16 matmuls run natively: compute capability >= 8.0 on a GPU, AVX512-BF16 / AMX on a CPU."""

    def describe(self) -> str:
        """``"cuda (Tesla T4, compute capability 7.5, 15.0 GB)"`` / ``"cpu"``."""
        if self.kind != "cuda":
            return "cpu" + (" (native bf16)" if self.native_bf16 else "")
        details = [self.name]
        if self.capability is not None:
            details.append(f"compute capability {self.capability[0]}.{self.capability[1]}")
        if self.total_memory:
            details.append(f"{self.total_memory / 1e9:.1f} GB")
        return f"cuda ({', '.join(details)})"


def current_device() -> DeviceInfo:
    """The :class:`DeviceInfo` of this process: GPU 0 when CUDA is available, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return DeviceInfo("cpu", "CPU", native_bf16=cpu_has_native_bf16())
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceInfo(
        "cuda",
        torch.cuda.get_device_name(index),
        capability=(major, minor),
        total_memory=int(torch.cuda.get_device_properties(index).total_memory),
        # Not torch.cuda.is_bf16_supported(): it counts emulation and answers True on a T4.
        native_bf16=major >= 8 or torch.cuda.is_bf16_supported(including_emulation=False),
    )


@attrs.frozen
class PrecisionDecision:
    """What ``precision`` became on a device, and why (see :func:`decide_precision`)."""

    precision: str
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the Trainer's mixed-precision mode."""
    reason: str
    """Why, as ``explain()`` shows it."""
    compute_dtype: str
    """dtype of 4-bit matmuls (bitsandbytes ``bnb_4bit_compute_dtype``) and of GPU weights: follows precision."""

    def adapter_dtype(self, quantized: bool) -> str:
        """dtype of the trained adapter weights. Never fp16: the gradient scaler refuses fp16 gradients, so
        under fp16 the adapter trains in fp32 (PEFT's upcast; on a quantized base lorakit undoes TRL's bf16 cast,
        which a GPU without native bf16 would only emulate). On a bf16 run with a quantized base it is bf16
        (TRL's cast, the QLoRA paper's choice); on an fp32 run fp32."""
        return "bf16" if quantized and self.precision == "bf16" else "fp32"

    @property
    def grad_scaler(self) -> bool:
        """fp16 training scales the loss (``torch.amp.GradScaler``, the Trainer's ``fp16=True``)."""
        return self.precision == "fp16"


def _decision(precision: str, reason: str, device: DeviceInfo) -> PrecisionDecision:
    # On CPU, bf16 is autocast over fp32 weights; GPUs load the weights (and 4-bit compute) in the precision.
    compute = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32") if device.kind == "cuda" else "fp32"
    return PrecisionDecision(precision, reason, compute_dtype=compute)


def hidden_size_of(config: Any) -> int | None:
    """The hidden size of a model config (its text part for multimodal configs), None when it has none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


CPU_BF16_MIN_HIDDEN = 256
"""The smallest hidden size at which ``"auto"`` picks bf16 autocast on a native-bf16 CPU. Measured by
``bench/precision_crossover.py`` (a LoRA step, 4 x 256 tokens): bf16 is 0.96-1.03x fp32 at hidden 64, 1.07-1.10x at
128, 1.14-1.15x at 256, 1.57x at 576 (SmolLM2-135M); below 256 the casts eat most of the gain."""


def decide_precision(requested: str, device: DeviceInfo, hidden_size: int | None = None) -> PrecisionDecision:
    """The one precision decision: ``requested`` (``"auto"``, ``"bf16"``, ``"fp16"``, ``"fp32"``) on ``device``.

    ``"auto"`` is bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with a gradient scaler on
    older GPUs (a T4 is 7.5: it only emulates bf16); on a CPU it is bf16 autocast over fp32 weights where the
    CPU has native bf16 matmuls (AVX512-BF16 or AMX) and the model's ``hidden_size`` is at least
    :data:`CPU_BF16_MIN_HIDDEN` (SmolLM2-135M: 576; test-sized models gain nothing), fp32 otherwise
    (emulated bf16 would be slower than fp32).

    Example:
        >>> decide_precision("auto", DeviceInfo("cuda", "Tesla T4", capability=(7, 5))).precision
        'fp16'

    Raises:
        ConfigError: bf16/fp16 requested on a CPU that cannot run it.
    """
    gpu = device.describe()
    if device.kind != "cuda":
        if requested == "auto":
            if not device.native_bf16:
                return _decision("fp32", "fp32 (CPU without native bf16)", device)
            if hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN:
                return _decision(
                    "fp32",
                    f"fp32 (CPU with native bf16, but hidden size {hidden_size} < {CPU_BF16_MIN_HIDDEN}: "
                    "bf16 would gain little over its casts)",
                    device,
                )
            return _decision("bf16", "bf16 (CPU with native bf16: bf16 autocast over fp32 weights)", device)
        if requested == "bf16" and device.native_bf16:
            return _decision(
                "bf16", "bf16 (requested; fp32 weights, bf16 autocast on a native-bf16 CPU)", device
            )
        if requested in ("bf16", "fp16"):
            raise ConfigError(
                f"with_training(precision={requested!r}) needs a CUDA GPU"
                + (
                    " (or, for bf16, a CPU with native bf16: AVX512-BF16 or AMX)"
                    if requested == "bf16"
                    else ""
                )
                + " and none is available. Use precision='auto' (on this CPU: fp32)."
            )
        return _decision("fp32", "fp32 (requested)", device)
    if requested == "auto":
        if device.native_bf16:
            return _decision("bf16", f"bf16 ({gpu} has native bf16)", device)
        return _decision(
            "fp16",
            f"fp16 with a gradient scaler ({gpu} has no native bf16: needs compute capability 8.0)",
            device,
        )
    if requested == "bf16" and not device.native_bf16:
        warnings.warn(
            f"precision='bf16' on {gpu}: this GPU only emulates bf16, which is slow. precision='auto' picks "
            "fp16 with a gradient scaler.",
            stacklevel=3,
        )
        return _decision("bf16", f"bf16 (requested; emulated on {device.name}, slow)", device)
    return _decision(requested, f"{requested} (requested)", device)


def resolve_precision(
    precision: str, device: DeviceInfo | None = None, hidden_size: int | None = None
) -> str:
    """``precision`` resolved on ``device`` (default: this machine), see :func:`decide_precision`."""
    return decide_precision(precision, device or current_device(), hidden_size).precision


def inference_placement(device: str | None, dtype: str | None, info: DeviceInfo) -> tuple[str, str]:
    """Where and in which precision ``InferenceModel`` loads: ``(device kind, "fp32" | "bf16" | "fp16")``.

    ``device=None`` is the GPU when there is one, else the CPU; ``dtype=None`` is the GPU's 16-bit type
    (:func:`decide_precision`: bf16 with native support, fp16 otherwise) on a GPU and fp32 on a CPU.

    Raises:
        ConfigError: an unknown device or dtype, or ``device="cuda"`` without a GPU.
    """
    kind = device or info.kind
    if kind not in ("cuda", "cpu"):
        raise ConfigError(
            f"device must be 'cuda', 'cpu' or None (the GPU when there is one), got {device!r}."
        )
    if kind == "cuda" and info.kind != "cuda":
        raise ConfigError("device='cuda' but no CUDA GPU is available; use device=None or 'cpu'.")
    if dtype is None:
        return kind, decide_precision("auto", info).precision if kind == "cuda" else "fp32"
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ConfigError(f"dtype must be 'fp32', 'bf16', 'fp16' (or 'float32', ...) or None, got {dtype!r}.")
    return kind, {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[name]


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX), so bf16 autocast can pay on it."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def flash_attention_installed() -> bool:
    """``flash_attn`` (flash-attention 2) can be imported."""
    from importlib.util import find_spec

    return find_spec("flash_attn") is not None


def decide_attention(requested: str, device: DeviceInfo) -> tuple[str | None, str]:
    """The ``attn_implementation`` to load with (None: transformers' default, SDPA where the model has it)
    and why.

    ``"auto"`` is flash-attention 2 on a GPU of compute capability >= 8.0 with ``flash_attn`` installed, else
    transformers' default (SDPA). An explicit ``"flash_attention_2"`` that cannot run is a ConfigError (no
    GPU / too old) or a MissingDependencyError (not installed).
    """
    fa2_gpu = device.kind == "cuda" and device.capability is not None and device.capability >= (8, 0)
    if requested == "auto":
        if fa2_gpu and flash_attention_installed():
            return "flash_attention_2", "flash_attention_2 (auto: installed, GPU supports it)"
        why = (
            "flash_attn not installed"
            if fa2_gpu
            else "flash-attention 2 needs a GPU of compute capability 8.0+"
        )
        return None, f"sdpa (auto: {why})"
    if requested == "flash_attention_2":
        if not fa2_gpu:
            raise ConfigError(
                f"from_model(attention='flash_attention_2') needs a CUDA GPU of compute capability 8.0+ "
                f"(Ampere or newer); this run is on {device.describe()}. Use attention='sdpa' (or 'auto')."
            )
        if not flash_attention_installed():
            raise MissingDependencyError(
                "from_model(attention='flash_attention_2') needs flash-attn: pip install flash-attn "
                "--no-build-isolation (or attention='sdpa')."
            )
    return requested, f"{requested} (requested)"


_MODEL_OPTIONS_OWNED = {
    "dtype": "from_model(dtype=...)",
    "torch_dtype": "from_model(dtype=...)",
    "quantization_config": "quantize_4bit() / quantize_8bit()",
    "load_in_4bit": "quantize_4bit()",
    "load_in_8bit": "quantize_8bit()",
    "trust_remote_code": "from_model(trust_remote_code=...)",
    "revision": "from_model(revision=...)",
    "attn_implementation": "from_model(attention=...)",
    "device_map": "lorakit's device placement (the GPU when there is one)",
    "config": "from_model(name_or_path) (the model's own config)",
    "pretrained_model_name_or_path": "from_model(name_or_path)",
    "gguf_file": "from_model(name_or_path)",
    "state_dict": "from_model(name_or_path)",
    "_from_auto": "nothing (internal)",
    "_from_pipeline": "nothing (internal)",
    "_commit_hash": "nothing (internal)",
}


def model_option_names(config: Any = None) -> set[str]:
    """Keyword arguments the installed ``from_pretrained`` takes: its parameters, the keywords it pops, and
    the attributes of the model's config (``config``; which it sets on the config, e.g. ``use_cache``)."""
    import inspect
    import re

    from transformers import PretrainedConfig, PreTrainedModel

    method = PreTrainedModel.from_pretrained
    names = set(inspect.signature(method).parameters) - {"model_args", "kwargs"}
    names |= set(re.findall(r'kwargs\.pop\("(\w+)"', inspect.getsource(method)))
    names |= {name for name in vars(config or PretrainedConfig()) if not name.startswith("_")}
    return names


def check_model_options(options: dict[str, Any], config: Any = None) -> None:
    """``from_model(model_options=)``: every key a ``from_pretrained`` keyword of the installed transformers
    (or an attribute of the model's ``config`` when given), none that lorakit sets itself.

    Without ``config`` only the keys lorakit owns are checked (config attributes cannot be told apart yet);
    :func:`load_base_model` and the plan check again with the model's config.

    Raises:
        ConfigError: naming the key, close matches (difflib), or the lorakit setting that owns it.
    """
    import difflib

    known = model_option_names(config)
    for key in options:
        if key in _MODEL_OPTIONS_OWNED:
            raise ConfigError(
                f"from_model(model_options={{{key!r}: ...}}): lorakit sets {key!r} itself; use "
                f"{_MODEL_OPTIONS_OWNED[key]} instead."
            )
        if config is not None and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise ConfigError(
                f"from_model(model_options={{{key!r}: ...}}): {key!r} is neither a keyword argument of "
                "transformers' from_pretrained nor an attribute of the model's config"
                + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ".")
            )


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
    device: str | None = None,
) -> Any:
    """Load the causal LM in ``dtype`` (or quantized with bitsandbytes) on the training device.

    ``quant_storage`` stores 4-bit weights in that dtype so FSDP / ZeRO-3 can shard them (QLoRA on many GPUs).
    ``device="cuda"`` places an un-quantized model on the GPU(s) with ``device_map="auto"`` (inference; the
    Trainer places training models itself). ``spec.attention`` and ``spec.options`` are passed on.
    """
    from transformers import AutoModelForCausalLM

    if spec.options:
        check_model_options(spec.option_dict, load_model_config(spec))
    kwargs: dict[str, Any] = {"dtype": dtype, **_hub_kwargs(spec), **spec.option_dict}
    if spec.dtype != "auto":
        kwargs["dtype"] = torch_dtype(spec.dtype)
    attention, _ = decide_attention(spec.attention, current_device())
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant, kwargs["dtype"], quant_storage)
        kwargs["device_map"] = {"": 0} if device_kind() == "cuda" else {"": "cpu"}
    elif device == "cuda":
        kwargs["device_map"] = "auto"
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

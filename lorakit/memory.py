"""Memory of a training run, estimated from the model on the meta device (no weights loaded).

The weight bytes follow the storage layout of the loaders exactly: transformers' bitsandbytes integration
decides which modules stay unquantized, bitsandbytes' ``quantize_4bit`` / ``int8_vectorwise_quant`` decide
the bytes of each quantized weight and its constants. Gradients and optimizer state follow from the trainable
parameters and the optimizer. Activations are an estimate per token, calibrated on CPU (see
``docs/memory.md`` and ``bench/plan_memory.py``). Not modelled: the CUDA context, allocator caching and
fragmentation, FSDP/ZeRO sharding, temporary buffers of kernels.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import DataSpec
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.pipeline import Pipeline

__all__ = [
    "MemoryEstimate",
    "activation_bytes",
    "activation_shape",
    "base_weight_bytes",
    "decide_frozen_bf16",
    "estimate_memory",
    "format_bytes",
    "frozen_linears",
    "fused_chunk_tokens",
    "measured_weight_bytes",
    "optimizer_state_bytes",
]

# Activation values one decoder layer saves for the backward pass, per token: LAYER_PER_HIDDEN per hidden
# unit + LAYER_PER_INTERMEDIATE per MLP unit + LAYER_PER_KV per key/value unit, with LoRA (dropout 0.05) on
# every linear layer. Fitted to the bytes autograd saves (``torch.autograd.graph.saved_tensors_hooks``) for
# three Llama shapes in fp32 on CPU -- the tiny test model, SmolLM2-135M and a 128/512 one -- and checked on a
# fourth (96/256, 3 layers): 0.7% under. ``bench/plan_memory.py`` measures; docs/memory.md has the table.
#
# The LoRA dropout masks are counted apart (:data:`DROPOUT_MASKS_PER_HIDDEN`, :data:`DROPOUT_MASKS_PER_INTERMEDIATE`
# values per token): ``nn.Dropout`` on CPU saves a mask of its input's dtype (4 bytes in fp32, the fit above
# had them: 17.4 = 11.4 + 6 and 4.5 = 3.5 + 1), lorakit's :class:`lorakit.fused.MaskDropout` a bool mask
# (1 byte), and dropout 0 none.
LAYER_PER_HIDDEN = 11.4
LAYER_PER_INTERMEDIATE = 3.5
LAYER_PER_KV = 2.0
# One mask per adapted layer input: q, k, v, o, gate and up read hidden-sized inputs, down an intermediate one.
DROPOUT_MASKS_PER_HIDDEN = 6
DROPOUT_MASKS_PER_INTERMEDIATE = 1
# fp32 values per token and vocabulary entry: the logits (held by the model output) and the log-softmax the
# cross-entropy saves (measured: exactly one saved vocabulary-sized tensor).
LOGITS_FACTOR = 2.0
# Bytes per activation value (dropout masks apart) under bf16 autocast on a CPU: matmul outputs are bf16, the
# residual stream and the norms stay fp32. Measured with saved_tensors_hooks on SmolLM2-135M (LoRA r=16
# all-linear, bool dropout masks) at 512 and 2048 tokens: 2.21-2.25 bytes per value.
CPU_AUTOCAST_BYTES = 2.2
# The training's peak resident memory on a CPU per byte of the estimate, at most: glibc keeps freed activation
# blocks for reuse (fast: no page faults; lorakit.memory.pin_mmap_threshold trades that for memory), and how much
# it keeps varies from run to run (the peak comes in the first, longest step). Measured by bench/scaling.py
# (SmolLM2-135M, batch 4, max length 128/512/1024, 1k and 10k rows, bf16 autocast and fp32, four runs): peak RSS
# minus the RSS before train() was 1.05-1.84x the estimate (1.84 in fp32 once the fused loss's CPU chunk, and with
# it the estimate, got smaller), so the plan shows an upper bound (2.0).
CPU_RSS_FACTOR = 2.0
# Loss positions the fused loss projects at once (lorakit.fused uses these values, fused_chunk_tokens picks one).
# On a GPU 1024. On a CPU 128: SmolLM2's 49k-entry vocabulary then gives 25 MB of fp32 logits per chunk, under
# glibc's largest mmap threshold (32 MiB), so each chunk reuses heap blocks instead of faulting in fresh pages
# (with 1024 positions every chunk was a fresh ~200 MB mmap). The loss of 469 positions, forward and backward:
# 212-237 ms against 252-301 ms (four runs); a SmolLM2 training (batch 4 x 512, bf16, 8 steps, three
# alternating runs): peak RSS 4.37-4.54 vs 4.66-4.94 GB, 1.04x as fast, the same loss to 1e-7. With a 128k
# vocabulary 64-1024 positions ran alike (670-710 ms), so there the smaller chunk only saves memory.
FUSED_CHUNK_TOKENS = 1024
FUSED_CHUNK_TOKENS_CPU = 128
# 4-bit blocks (bitsandbytes ``Params4bit`` default) and the second-level blocks of double quantization.
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256
# bitsandbytes' 8-bit optimizers: blocks of 256 values with an fp32 absmax; smaller tensors keep fp32 state.
BLOCKSIZE_OPTIM_8BIT = 256
MIN_8BIT_SIZE = 4096
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, like ``get_memory_footprint`` users usually print)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@attrs.frozen
class MemoryEstimate:
    """Bytes one training process holds, by kind; ``total`` is their sum."""

    weights: int
    """Frozen base weights and buffers in their stored form (quantized data and constants included)."""
    adapter: int
    """Trainable parameters: the adapter, or with full fine-tuning / ``freeze()`` the trained weights."""
    gradients: int
    """Gradients of the trainable parameters."""
    optimizer: int
    """Optimizer state of the trainable parameters."""
    activations: int
    """Tensors saved for the backward pass of one micro-batch of full-length sequences (an estimate)."""
    batch_size: int
    """Sequences per micro-batch used for ``activations``."""
    seq_len: int
    """Tokens per sequence used for ``activations`` (the data's ``max_length``)."""
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """The assumptions behind the numbers."""
    trained_label: str = "adapter"
    """How :meth:`render` names ``adapter``: ``"trained weights"`` when no adapter is used."""
    allocator_factor: float = 1.0
    """Resident memory of the training per byte of ``total``, at most (CPU: :data:`CPU_RSS_FACTOR`; 1 on a GPU)."""
    total: int = attrs.field(init=False)
    """weights + adapter + gradients + optimizer + activations."""

    @total.default
    def _total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations

    @property
    def resident(self) -> int:
        """An upper bound of the training's peak resident memory: ``total`` times ``allocator_factor``."""
        return int(self.total * self.allocator_factor)

    def render(self) -> str:
        """One line: ``weights 270.1 MB, adapter 4.9 MB, grads ... = ~359 MB``; on a CPU with the resident bound."""
        line = (
            f"weights {format_bytes(self.weights)}, {self.trained_label} {format_bytes(self.adapter)}, "
            f"grads {format_bytes(self.gradients)}, optimizer {format_bytes(self.optimizer)}, "
            f"activations ~{format_bytes(self.activations)} (batch {self.batch_size} x {self.seq_len}) "
            f"= ~{format_bytes(self.total)}"
        )
        if self.allocator_factor != 1.0:
            line += (
                f"; peak RSS up to ~{format_bytes(self.resident)} (CPU allocator, x{self.allocator_factor:g})"
            )
        return line


# --- weights ------------------------------------------------------------------------------------------------

# Name parts PEFT inserts around a wrapped module; removed to get the name transformers' loader sees.
_PEFT_PARTS = (".base_layer", ".original_module")


def _original_name(name: str) -> str:
    for part in _PEFT_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("base_model.model.")


def modules_not_quantized(model: Any) -> list[str]:
    """The module names transformers' bitsandbytes loader keeps unquantized (``get_keys_to_not_convert``).

    Tied weights, the last parameter's module and the output embeddings, plus the model class's
    ``_keep_in_fp32_modules``; lorakit sets no ``llm_int8_skip_modules``. Names are those of the plain model.
    """
    skip: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    skip |= set(tied) | set(tied.values())
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        skip.add(_original_name(frozen[-1]))
    output = model.get_output_embeddings()
    skip |= {_original_name(name) for name, module in model.named_modules() if module is output}
    skip |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sorted({key.removesuffix(".weight") for key in skip})


def quantized_4bit_bytes(numel: int, *, double_quant: bool) -> int:
    """Bytes of one weight after ``bitsandbytes.functional.quantize_4bit`` (uint8 storage, blocksize 64).

    Two values per byte; one fp32 absmax per block and the 16-entry fp32 code. Double quantization stores
    the absmax as uint8 (``quantize_blockwise``, blocks of 256) plus an fp32 offset, one fp32 absmax per 256
    blocks and its own copy of the 256-entry fp32 dynamic code.
    """
    blocks = math.ceil(numel / BLOCKSIZE_4BIT)
    data = (numel + 1) // 2
    code = 16 * 4
    if not double_quant:
        return data + code + 4 * blocks
    return data + code + blocks + 4 + 4 * math.ceil(blocks / BLOCKSIZE_NESTED) + 256 * 4


def quantized_8bit_bytes(rows: int, cols: int) -> int:
    """Bytes of one weight after ``int8_vectorwise_quant``: int8 values and one fp32 scale per output row."""
    return rows * cols + 4 * rows


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers has it
        return ()
    return (Conv1D,)


def base_weight_bytes(model: Any, *, float_bytes: int, quant: Any = None) -> int:
    """Bytes of the frozen parameters and buffers of ``model`` (meta device is fine) as they will be stored.

    ``float_bytes`` is the element size of unquantized parameters; ``quant`` a :class:`~lorakit.config.QuantSpec`
    or None. Which linear layers are quantized follows transformers' ``replace_with_bnb_linear``: exactly
    ``nn.Linear`` (or GPT-2's ``Conv1D``) modules not matched by :func:`modules_not_quantized`.
    """
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = modules_not_quantized(model) if quant is not None else None
    conv1d = _conv1d_types()
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        quantized = (
            quant is not None
            and (type(module) is torch.nn.Linear or isinstance(module, conv1d))
            and should_convert_module(_original_name(name), skip)
        )
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen or param.requires_grad:
                continue
            seen.add(id(param))
            if quantized and pname == "weight":
                if quant.bits == 4:
                    total += quantized_4bit_bytes(param.numel(), double_quant=quant.double_quant)
                else:
                    rows = param.shape[0] if type(module) is torch.nn.Linear else param.shape[1]
                    total += quantized_8bit_bytes(rows, param.numel() // rows)
            else:
                total += param.numel() * float_bytes
        for buf in module.buffers(recurse=False):
            if id(buf) not in seen:
                seen.add(id(buf))
                total += buf.numel() * buf.element_size()
    return total


def measured_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of a loaded model: ``footprint`` is ``model.get_memory_footprint()`` (parameters and buffers), and
    ``quant_constants`` the bitsandbytes tensors it does not see (4-bit absmax, codes, nested state; 8-bit
    row scales), each storage counted once; ``total`` is their sum."""
    import torch

    counted = {
        t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel() > 0
    }
    extra = 0

    def add(tensor: Any) -> None:
        nonlocal extra
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in counted:
                counted.add(ptr)
                extra += tensor.untyped_storage().nbytes()

    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            for key in ("absmax", "code", "offset"):
                add(getattr(state, key, None))
            if getattr(state, "state2", None) is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(param, "SCB", None))
    footprint = int(model.get_memory_footprint())
    return {"footprint": footprint, "quant_constants": extra, "total": footprint + extra}


# --- optimizer ----------------------------------------------------------------------------------------------


def optimizer_state_bytes(optim: str, shapes: list[tuple[int, ...]], param_bytes: int) -> tuple[int, str]:
    """Bytes of the optimizer state for trainable tensors of these shapes, and a note on how they were counted.

    AdamW keeps two moments like the parameter; bitsandbytes' 8-bit AdamW two uint8 moments with an fp32
    absmax per 256 values (tensors under 4096 values keep fp32 moments); Adafactor (transformers' defaults, no
    first moment) factored second moments of rows + columns; plain SGD (no momentum) nothing.
    """
    numels = [math.prod(shape) for shape in shapes]
    if optim in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        return 2 * param_bytes * sum(numels), "AdamW: 2 moments per trainable value"
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for n in numels:
            if n < MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                total += 2 * (n + 4 * math.ceil(n / BLOCKSIZE_OPTIM_8BIT))
        return total, "8-bit AdamW: uint8 moments + fp32 absmax per 256 (fp32 under 4096 values)"
    if optim == "adafactor":
        total = sum(
            (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else math.prod(s) for s in shapes
        )
        return 4 * total, "Adafactor: factored second moment, no first moment"
    if optim == "sgd":
        return 0, "SGD without momentum: no state"
    raise ValueError(f"no memory model for optim={optim!r}")


# --- the CPU allocator ---------------------------------------------------------------------------------------

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD_BYTES = 2 * 2**20
""":func:`pin_mmap_threshold`'s default: blocks of 2 MiB and more (SmolLM2's bf16 activations at batch 4 x 512)."""
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve every block of ``threshold`` bytes or more with its own ``mmap``, returned to the OS when
    freed: an opt-in trade of speed for resident memory, process-wide; ``train()`` does not call it. Call it
    before ``train()``.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); after the first training
    step most activation tensors (a few MB each) then come from the heap, whose freed pieces stay resident and
    are reused without page faults, and how much it keeps varies from run to run. Pinned, every block of
    ``threshold`` bytes or more is a fresh ``mmap`` that faults its pages in. Measured on SmolLM2-135M (LoRA
    r=16, batch 4 x 512, bf16 autocast, 8 steps; training RSS over the plan's held estimate, and the time of
    steps 2-8 against unpinned runs of the same script): unpinned 1.37-1.58; pinned at 2 MiB (the default)
    1.11-1.15 at 0.82x the speed; at 128 KiB 1.10 at 0.44x. Returns False where there is no glibc (macOS,
    Windows, musl).

    Raises:
        ConfigError: ``threshold`` is not between 1 byte and 32 MiB (glibc refuses larger ones).
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 0 < threshold <= MMAP_THRESHOLD_MAX
    ):
        raise ConfigError(
            f"pin_mmap_threshold(threshold={threshold!r}): give a number of bytes between 1 and "
            f"{MMAP_THRESHOLD_MAX} (32 MiB, glibc's largest), e.g. 2 * 2**20"
        )
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc: nothing to pin
        return False


# --- activations --------------------------------------------------------------------------------------------


def activation_bytes(
    *,
    tokens: int,
    hidden: int,
    intermediate: int,
    kv: int,
    layers: int,
    vocab: int,
    grad_checkpointing: bool,
    element_bytes: float = 4,
    fused_loss: bool = False,
    fused_chunk: int = FUSED_CHUNK_TOKENS,
    mask_bytes: float = 0,
) -> int:
    """Bytes held for the backward pass of ``tokens`` tokens (batch x sequence length).

    Without checkpointing every layer keeps ``LAYER_PER_HIDDEN * hidden + LAYER_PER_INTERMEDIATE *
    intermediate + LAYER_PER_KV * kv`` values per token; with it each layer keeps only its input and one layer at
    a time is recomputed during the backward pass. The loss keeps ``LOGITS_FACTOR`` fp32 values per token and
    vocabulary entry; the fused loss (:mod:`lorakit.fused`) only one chunk of ``fused_chunk`` tokens' logits
    at a time (:func:`fused_chunk_tokens`) plus the fp32 gradient of the hidden states it saves for the backward
    pass.
    ``mask_bytes``: bytes per value of the LoRA dropout masks (1: lorakit's bool masks; 0: no dropout).
    """
    per_token = LAYER_PER_HIDDEN * hidden + LAYER_PER_INTERMEDIATE * intermediate + LAYER_PER_KV * kv
    masks = (DROPOUT_MASKS_PER_HIDDEN * hidden + DROPOUT_MASKS_PER_INTERMEDIATE * intermediate) * mask_bytes
    per_layer = (per_token * element_bytes + masks) * tokens
    if grad_checkpointing:
        layer_part = layers * tokens * hidden * element_bytes + per_layer
    else:
        layer_part = layers * per_layer
    if fused_loss:
        return int(layer_part + LOGITS_FACTOR * min(tokens, fused_chunk) * vocab * 4 + tokens * hidden * 4)
    return int(layer_part + LOGITS_FACTOR * tokens * vocab * 4)


def fused_chunk_tokens(device: str, *, head_trained: bool = False) -> int:
    """Loss positions the fused loss projects at once on ``device`` (``"cpu"``, ``"cuda"``, ...): 128 on a CPU,
    1024 elsewhere, and 1024 on a CPU too when the LM head is trained (``head_trained``: every chunk then adds a
    vocabulary x hidden gradient, ~113 MB in fp32 for SmolLM2, so fewer, larger chunks are cheaper)."""
    return FUSED_CHUNK_TOKENS_CPU if device == "cpu" and not head_trained else FUSED_CHUNK_TOKENS


def activation_shape(config: Any) -> dict[str, int]:
    """hidden, intermediate, kv (key/value width), layers and vocab of a model config (its text part)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden,
        "intermediate": getattr(text, "intermediate_size", None) or 4 * hidden,
        "kv": (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        "layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
    }


# --- the estimate -------------------------------------------------------------------------------------------


def estimate_memory(
    pipeline: Pipeline,
    peft_model: Any,
    config: Any,
    *,
    precision: str,
    device: str,
    grad_checkpointing: bool,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``pipeline.train()`` from its PEFT model on the meta device.

    Args:
        pipeline: the pipeline (its quantization, optimizer, batch size and data ``max_length`` are used).
        peft_model: the model with the adapter applied, on the meta device (``plan.apply_method_on_meta``).
        config: the model's ``PretrainedConfig``.
        precision: the resolved training precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
        device: ``"cuda"`` or ``"cpu"``.
        grad_checkpointing: whether activations are checkpointed (``plan.decide_grad_checkpointing(...).on``).
    """
    assert pipeline.model is not None
    notes: list[str] = []
    # Unquantized weights: the model's dtype, else the precision on a GPU, fp32 on CPU (bf16 there is autocast).
    dtype = pipeline.model.dtype
    float_bytes = FLOAT_BYTES[dtype if dtype != "auto" else (precision if device == "cuda" else "fp32")]
    if pipeline.quant is not None and float_bytes < 4:
        float_bytes = 4
        notes.append("prepare_model_for_kbit_training upcasts unquantized fp16/bf16 weights to fp32")
    weights = _weight_bytes(pipeline.quant, peft_model, float_bytes, notes)
    frozen_bf16 = decide_frozen_bf16(pipeline, precision, device)
    if frozen_bf16:
        weights -= sum(p.numel() * 2 for m in frozen_linears(peft_model) for p in m.parameters(recurse=False))
        notes.append(
            "frozen linear weights stored in bf16 (CPU bf16 autocast multiplies them in bf16 anyway)"
        )
    full = getattr(pipeline.resolved_method, "name", None) == "full"
    adapter, optimizer = _trained_bytes(
        pipeline, peft_model, float_bytes=float_bytes, precision=precision, full=full, notes=notes
    )
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head_trained = head is not None and any(p.requires_grad for p in head.parameters())
    seq_len, activations = _activation_part(
        pipeline, config, precision, grad_checkpointing, notes, device, head_trained=head_trained
    )
    if device != "cuda" and precision == "bf16":
        # CPU autocast over fp32 weights saves a bf16 copy of each frozen matmul weight for the backward pass;
        # the frozen linear weights stored in bf16 need no copy.
        activations += _autocast_weight_copies(peft_model, stored_bf16=frozen_bf16)
        notes.append("bf16 autocast on CPU: matmul outputs in bf16, the residual stream and norms in fp32")
    return MemoryEstimate(
        weights=weights,
        adapter=adapter,
        gradients=adapter,  # gradients have the dtype of their parameter
        optimizer=optimizer,
        activations=activations,
        batch_size=pipeline.training.batch_size,
        seq_len=seq_len,
        notes=tuple(notes),
        trained_label="trained weights" if full else "adapter",
        allocator_factor=CPU_RSS_FACTOR if device != "cuda" else 1.0,
    )


def _weight_bytes(quant: Any, peft_model: Any, float_bytes: int, notes: list[str]) -> int:
    """Bytes of the frozen base weights as stored, with a note on the quantized layout."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    weights = base_weight_bytes(base, float_bytes=float_bytes, quant=quant)
    if quant is not None:
        layout = (
            f"4-bit {quant.quant_type}, blocks of {BLOCKSIZE_4BIT}, "
            + ("uint8 absmax (double quant)" if quant.double_quant else "fp32 absmax")
            if quant.bits == 4
            else "int8 with an fp32 scale per row"
        )
        notes.append(f"linear layers {layout}; {', '.join(modules_not_quantized(base))} unquantized")
    return weights


def _trained_bytes(
    pipeline: Pipeline, peft_model: Any, *, float_bytes: int, precision: str, full: bool, notes: list[str]
) -> tuple[int, int]:
    """(bytes of the trainable parameters, bytes of their optimizer state)."""
    quant = pipeline.quant
    trainable = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    # TRL casts the adapter of a quantized model to bf16 (not DoRA's magnitude); lorakit re-casts it on fp32 runs.
    bf16_adapter = quant is not None and precision != "fp32"
    param_bytes = {
        name: 2 if bf16_adapter and "lora_magnitude_vector" not in name else 4 for name, _ in trainable
    }
    # Full fine-tuning / freeze(): no adapter; ``adapter`` is then the trained part of the model's own weights
    # (``weights`` counts only the frozen part), stored in the model's dtype.
    if full:
        param_bytes = {name: float_bytes for name, _ in trainable}
    adapter = sum(p.numel() * param_bytes[name] for name, p in trainable)
    if full:
        notes.append("full fine-tuning: 'adapter' is the trained part of the model's own weights")
    else:
        notes.append("adapter in bf16 (TRL's QLoRA cast)" if bf16_adapter else "adapter in fp32")
    optimizer, optim_note = optimizer_state_bytes(
        pipeline.training.optim,
        [tuple(p.shape) for _, p in trainable],
        float_bytes if full else (2 if bf16_adapter else 4),
    )
    notes.append(optim_note)
    return adapter, optimizer


def frozen_linears(model: Any) -> list[Any]:
    """The ``nn.Linear`` modules of ``model`` (PEFT-wrapped or not) with no trained parameter, the LM head
    excluded (often tied to the input embedding; the fused loss casts it chunk by chunk): the matmul weights CPU
    bf16 autocast would cast on every forward pass, stored in bf16 instead (:func:`decide_frozen_bf16`)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return [
        m
        for m in base.modules()
        if isinstance(m, torch.nn.Linear)
        and m is not head
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def decide_frozen_bf16(pipeline: Pipeline, precision: str, device: str) -> bool:
    """Store the frozen linear weights in bf16: on a CPU training in bf16 autocast (which multiplies them in bf16
    anyway, so the numbers are the same and each forward pass skips the cast), for single-process SFT with an
    unquantized fp32 base and a method that allows it (:attr:`MethodBase.frozen_weights_bf16_ok`)."""
    assert pipeline.model is not None
    return (
        device != "cuda"
        and precision == "bf16"
        and pipeline.quant is None
        and pipeline.model.dtype == "auto"
        and pipeline.preference is None
        and pipeline.distribution is None
        and pipeline.resolved_method.frozen_weights_bf16_ok
    )


def _autocast_weight_copies(peft_model: Any, *, stored_bf16: bool = False) -> int:
    """Bytes of the bf16 copies CPU autocast makes of the frozen matmul weights of the decoder layers (saved for
    the backward pass); none of those stored in bf16 already (``stored_bf16``). The embedding is not a matmul;
    the LM head is left out too (the fused loss casts it chunk by chunk and keeps no copy; TRL's unfused loss
    would keep one more, 2 bytes per head weight)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    skip = {
        id(p)
        for m in (base.get_input_embeddings(), base.get_output_embeddings())
        if m
        for p in m.parameters()
    }
    if stored_bf16:
        skip |= {id(m.weight) for m in frozen_linears(base)}
    return 2 * sum(
        p.numel() for p in base.parameters() if p.dim() == 2 and not p.requires_grad and id(p) not in skip
    )


def _activation_part(
    pipeline: Pipeline,
    config: Any,
    precision: str,
    grad_checkpointing: bool,
    notes: list[str],
    device: str,
    *,
    head_trained: bool = False,
) -> tuple[int, int]:
    """(sequence length, activation bytes) of one micro-batch of full-length sequences."""
    default_length = attrs.fields(DataSpec).max_length.default
    assert isinstance(default_length, int)
    seq_len = pipeline.data.max_length if pipeline.data is not None else default_length
    if pipeline.data is None:
        notes.append(f"sequence length {seq_len} (DataSpec default) until with_dataset(max_length=...)")
    # The fused loss trains SFT runs of methods without virtual tokens (multi-process runs fall back to TRL's).
    fused = (
        pipeline.training.fused_loss
        and pipeline.preference is None
        and not pipeline.resolved_method.virtual_tokens
        and pipeline.distribution is None
    )
    activations = activation_bytes(
        tokens=pipeline.training.batch_size * seq_len,
        **activation_shape(config),
        grad_checkpointing=grad_checkpointing,
        element_bytes=4 if precision == "fp32" else CPU_AUTOCAST_BYTES if device != "cuda" else 2,
        fused_loss=fused,
        fused_chunk=fused_chunk_tokens(device, head_trained=head_trained),
        # lorakit's dropout keeps bool masks on a CPU; a GPU's fused dropout a bool mask too
        mask_bytes=1 if pipeline.resolved_method.dropout_masks else 0,
    )
    notes.append(
        f"activations for full-length sequences, gradient checkpointing {'on' if grad_checkpointing else 'off'}, "
        + ("fused loss (one logits chunk), " if fused else "")
        + "factor calibrated on CPU in fp32"
    )
    return seq_len, activations

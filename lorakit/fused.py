"""Speed paths of the training step: the fused (chunked) linear cross-entropy and compiling decoder blocks.

Fused linear cross-entropy (:func:`fused_linear_cross_entropy`): the loss of a causal LM head without the
``(batch, length, vocabulary)`` logits. Only positions whose next-token label is not ``-100`` are projected
(prompt and padding positions never reach the LM head), in chunks (:func:`lorakit.memory.fused_chunk_tokens`:
1024 positions, 128 on a CPU); each chunk's
logits live only while its loss and its gradient are computed, in the forward pass (the gradient of a summed
cross-entropy is known before the backward pass: ``softmax - one_hot``), so the backward pass is a scaling and
no chunk is projected twice. TRL's own fused head (``trl.trainer.utils.add_fused_lm_head``) projects every
position on CPU and recomputes each tile in the backward pass, with entropy and accuracy on every step.

Compiling (:func:`compile_blocks`): ``torch.compile`` of each decoder layer in place (``nn.Module.compile``),
so the model keeps its class, its parameter names and its PEFT wrapper; the first steps pay the compile time.

Dropout masks (:class:`MaskDropout`, :func:`use_mask_dropout`): LoRA's dropout draws one mask per adapted
layer input; on a CPU ``nn.Dropout`` draws it with ``bernoulli_`` into a tensor of the input's dtype (15% of a
bf16 SmolLM2 step). :class:`MaskDropout` keeps the distribution (each value dropped with probability ``p``, to
within 2**-17, the rest scaled to keep the expectation) from 16 random bits per value, and keeps a bool mask.

Frozen weights in bf16 (:func:`store_frozen_bf16`): under CPU bf16 autocast every forward pass casts each
frozen fp32 linear weight to bf16 and keeps that copy for the backward pass. Stored in bf16, the matmuls get the
same operands without the casts and the copies (:func:`lorakit.memory.decide_frozen_bf16` says when).

All are used by :mod:`lorakit.training` / :mod:`lorakit.trainer`; ``docs/benchmarks.md`` has the numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lorakit.data.encode import IGNORE_INDEX
from lorakit.memory import FUSED_CHUNK_TOKENS, frozen_linears, fused_chunk_tokens

__all__ = [
    "CHUNK_TOKENS",
    "MaskDropout",
    "compile_blocks",
    "decoder_layers",
    "fused_linear_cross_entropy",
    "fused_loss_applies",
    "keep_mask",
    "store_frozen_bf16",
    "use_mask_dropout",
]

CHUNK_TOKENS = FUSED_CHUNK_TOKENS
"""Loss positions projected at once off a CPU or with a trained head (1024 x a 49k vocabulary is 200 MB of fp32
logits); on a CPU otherwise 128 (:func:`lorakit.memory.fused_chunk_tokens`)."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, gradients computed in the forward."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, chunk: int) -> Any:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            total += (lse - logits[rows, t]).sum()
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits[rows, t] -= 1.0  # d loss / d logits = softmax - one_hot
            grad_hidden[start : start + chunk] = logits.to(dtype) @ w
            if grad_weight is not None:
                grad_weight += (logits.to(dtype).t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> Any:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (grad_hidden * grad_output).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None


def fused_linear_cross_entropy(
    hidden: Any, weight: Any, labels: Any, *, chunk: int | None = None
) -> tuple[Any, Any]:
    """``(summed loss, number of loss tokens)`` of a causal LM head ``weight`` over ``hidden`` states.

    ``hidden`` is ``(batch, length, hidden)``, ``labels`` ``(batch, length)`` unshifted (position ``i`` predicts
    label ``i + 1``, as transformers' causal LM loss); ``-100`` labels carry no loss. Equals
    ``F.cross_entropy(hidden @ weight.T shifted, labels, reduction="sum")`` without building those logits.
    ``chunk``: loss positions projected at once; by default :func:`lorakit.memory.fused_chunk_tokens` of
    ``hidden``'s device (and whether ``weight`` is trained).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    targets = shifted[mask]
    if targets.numel() == 0:  # keep the graph connected: a zero that still reaches the model
        return hidden.sum() * 0.0, mask.sum()
    chunk = chunk or fused_chunk_tokens(hidden.device.type, head_trained=weight.requires_grad)
    return _LinearCrossEntropy.apply(selected, weight, targets, chunk), mask.sum()


def fused_loss_applies(model: Any) -> bool:
    """Whether ``model`` (a causal LM, PEFT-wrapped or not) has a plain linear head the fused loss reproduces:
    no bias, no logit scaling or soft-capping, and no virtual tokens (prompt-learning methods)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = base.config.get_text_config()
    scaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling")
    )
    return (
        isinstance(head, torch.nn.Linear) and head.bias is None and not scaled and hasattr(base, "base_model")
    )


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a (PEFT-wrapped) causal LM: modules of its ``_no_split_modules`` classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_blocks(model: Any) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many were compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


# --- dropout masks --------------------------------------------------------------------------------------------


_MASK_BITS = 16  # random bits per mask value: a 16-bit slice of a 64-bit draw (the int16 view below)


def keep_mask(shape: Any, p: float, device: Any = None) -> tuple[Any, float]:
    """A bool mask of ``shape`` keeping each value independently with probability ``1 - q``, and ``q``: ``p``
    rounded to a multiple of 2**-16 (0.05 -> 0.0500031). Each value is a 16-bit slice of a 64-bit draw from the
    default generator (``random_(-2**63, None)``: all 64 bits), dropped when it is below ``q * 2**16`` (as a
    signed 16-bit number, shifted by 2**15): half the generator calls of one 32-bit draw per value, and on a CPU
    a third of its time (4 x 400 x 576 values: 0.75 vs 2.2 ms)."""
    numel = math.prod(shape)
    threshold = round(p * 2**_MASK_BITS)
    if threshold >= 2**_MASK_BITS:
        return torch.zeros(shape, dtype=torch.bool, device=device), 1.0
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    keep = draws.view(torch.int16)[:numel] >= threshold - 2 ** (_MASK_BITS - 1)
    return keep.view(shape), threshold / 2**_MASK_BITS


class MaskDropout(torch.nn.Dropout):
    """``nn.Dropout`` with the same distribution, kept as a bool mask (:func:`keep_mask`): each value is dropped
    independently with probability ``p`` (to within 2**-17), the rest are scaled by ``1 / (1 - q)`` for the
    rounded ``q``, so the expectation is the input. On a CPU the mask with its comparison takes 0.97 ms for
    4 x 400 x 576 values, against 2.41 ms drawn as 31-bit integers (lorakit before) and ~5 ms for ``bernoulli_``
    into a float tensor (``nn.Dropout``); a SmolLM2-135M bf16 step (forward and backward, batch 4 x 400) is
    1.13x faster than with 31-bit draws. The saved mask is 1 byte per value instead of the input's 2-4. (Two
    masks per 63-bit draw with ``torch.where`` was faster alone but slower in training: more temporaries.) Draws
    from the default generator, so ``seed`` reproduces it."""

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            return x
        keep, q = keep_mask(x.shape, self.p, x.device)
        if q == 1.0:
            return x * keep  # all dropped, like nn.Dropout(p=1)
        return (x * keep).mul_(1.0 / (1.0 - q))


def use_mask_dropout(model: Any) -> int:
    """Swap every adapter's ``nn.Dropout`` (PEFT's ``lora_dropout``) for a :class:`MaskDropout` of the same ``p``;
    returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = MaskDropout(dropout.p)
                dropouts[name].train(dropout.training)
                swapped += 1
    return swapped


# --- frozen weights in bf16 -----------------------------------------------------------------------------------


def _input_to_weight_dtype(module: Any, args: tuple[Any, ...]) -> Any:
    """Outside autocast (e.g. generation during evaluation) a bf16 linear gets a bf16 input..."""
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) or x.dtype == module.weight.dtype:
        return None
    return (x.to(module.weight.dtype), *args[1:])


def _output_to_fp32(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    """... and gives an fp32 output, like the rest of the fp32 model around it."""
    if torch.is_autocast_enabled(output.device.type) or output.dtype == torch.float32:
        return None
    return output.float()


def store_frozen_bf16(model: Any) -> int:
    """Store the frozen linear layers of ``model`` (:func:`lorakit.memory.frozen_linears`) in bf16; returns how
    many. Under bf16 autocast their matmuls are unchanged; outside it, hooks cast their input to bf16 and their
    output back to fp32, so the model still runs (in bf16 matmuls) anywhere.

    transformers maps the safetensors file into memory and each weight is a view of that mapping, which stays
    while any weight still refers to it, with every page read so far resident. So the frozen tensors that stay
    fp32 (the embedding, the norms) are copied out of it too: the mapping is then released, and with it the
    fp32 originals of the bf16 weights (SmolLM2-135M: 404 MB less resident memory)."""
    layers = frozen_linears(model)
    for layer in layers:
        layer.to(torch.bfloat16)
        layer.register_forward_pre_hook(_input_to_weight_dtype)
        layer.register_forward_hook(_output_to_fp32)
    if layers:
        _copy_out_frozen_tensors(model)
    return len(layers)


def _copy_out_frozen_tensors(model: Any) -> None:
    """Give each frozen fp32 parameter and floating buffer of ``model`` its own memory. ``parameters()`` and
    ``buffers()`` yield a shared tensor once, and ``.data`` is replaced in place, so tied weights stay tied."""
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.clone()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.clone()

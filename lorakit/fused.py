"""Speed paths of the training step: the fused (chunked) linear cross-entropy and compiling decoder blocks.

Fused linear cross-entropy (:func:`fused_linear_cross_entropy`): the loss of a causal LM head without the
``(batch, length, vocabulary)`` logits. Only positions whose next-token label is not ``-100`` are projected
(prompt and padding positions never reach the LM head), in chunks of :data:`CHUNK_TOKENS` tokens; each chunk's
logits live only while its loss and its gradient are computed, in the forward pass (the gradient of a summed
cross-entropy is known before the backward pass: ``softmax - one_hot``), so the backward pass is a scaling and
no chunk is projected twice. TRL's own fused head (``trl.trainer.utils.add_fused_lm_head``) projects every
position on CPU and recomputes each tile in the backward pass, with entropy and accuracy on every step.

Compiling (:func:`compile_blocks`): ``torch.compile`` of each decoder layer in place (``nn.Module.compile``),
so the model keeps its class, its parameter names and its PEFT wrapper; the first steps pay the compile time.

Both are used by :mod:`lorakit.training` / :mod:`lorakit.trainer`; ``docs/benchmarks.md`` has the numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.data.encode import IGNORE_INDEX
from lorakit.memory import FUSED_CHUNK_TOKENS

__all__ = [
    "CHUNK_TOKENS",
    "compile_blocks",
    "decoder_layers",
    "fused_linear_cross_entropy",
    "fused_loss_applies",
]

CHUNK_TOKENS = FUSED_CHUNK_TOKENS
"""Loss positions projected at once: 1024 x a 49k vocabulary is 200 MB of fp32 logits per chunk."""


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
    hidden: Any, weight: Any, labels: Any, *, chunk: int = CHUNK_TOKENS
) -> tuple[Any, Any]:
    """``(summed loss, number of loss tokens)`` of a causal LM head ``weight`` over ``hidden`` states.

    ``hidden`` is ``(batch, length, hidden)``, ``labels`` ``(batch, length)`` unshifted (position ``i`` predicts
    label ``i + 1``, as transformers' causal LM loss); ``-100`` labels carry no loss. Equals
    ``F.cross_entropy(hidden @ weight.T shifted, labels, reduction="sum")`` without building those logits.
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    targets = shifted[mask]
    if targets.numel() == 0:  # keep the graph connected: a zero that still reaches the model
        return hidden.sum() * 0.0, mask.sum()
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

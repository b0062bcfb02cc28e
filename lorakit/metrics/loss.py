"""The one loss lorakit reports outside the trainer: mean negative log-likelihood over label tokens.

For examples ``(input_ids, labels)`` encoded as training encodes them (:func:`lorakit.data.encode`)::

    loss = sum over every label token t of  -log p(input_ids[t] | input_ids[:t])
           ---------------------------------------------------------------
                          number of label tokens

- a *label token* is a position whose label is not :data:`lorakit.data.encode.IGNORE_INDEX`: exactly the tokens
  training puts loss on (with the built-in templates every assistant reply and its end-of-turn marker; the
  prompt too with ``train_on_inputs=True``). Labels are not shifted in the data: the logits at position
  ``t - 1`` score the token at ``t``, so position 0 is never scored;
- natural log (nats), logits in fp32, padding excluded;
- one token-weighted mean over the whole set: every label token counts once, whatever its row or batch (not a
  mean of per-row or per-batch means);
- ``perplexity = exp(loss)`` (:func:`lorakit.metrics.perplexity_from_loss`).

``lorakit.evaluate`` (so ``lorakit eval`` and the quickstart's table) and the merge check
(:mod:`lorakit.merging`) compute it with :func:`mean_token_nll` / :func:`token_nll`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorakit.data.encode import IGNORE_INDEX
from lorakit.errors import DataError
from lorakit.progress import progress

__all__ = ["mean_token_nll", "token_nll"]


def token_nll(logits: Any, labels: Any) -> tuple[float, int]:
    """The summed negative log-likelihood of the label tokens and their count (see the module docstring).

    Args:
        logits: ``(batch, length, vocab)`` or ``(length, vocab)`` model outputs.
        labels: token ids of the same ``(batch, length)`` / ``(length,)`` shape, IGNORE_INDEX where not scored.
    """
    import torch.nn.functional as F

    if labels.ndim == 1:
        logits, labels = logits[None], labels[None]
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(total), int((targets != IGNORE_INDEX).sum())


def mean_token_nll(
    model: Any,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    pad_token_id: int,
    desc: str | None = None,
) -> tuple[float, int]:
    """The loss of ``model`` on ``(input_ids, labels)`` examples, and the number of label tokens.

    Right-padded batches of ``batch_size``, one batch of logits in memory at a time (two running sums); the
    model runs in eval mode (its mode restored after). ``desc`` shows a progress bar with that label.

    Raises:
        DataError: no example has a label token.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts: Any = range(0, len(examples), batch_size)
    if desc is not None:
        starts = progress(starts, total=len(starts), desc=desc, unit="batch")
    try:
        for start in starts:
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([[*i, *[pad_token_id] * (width - len(i))] for i, _ in batch], device=device)
            labels = torch.tensor([[*lb, *[IGNORE_INDEX] * (width - len(lb))] for _, lb in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits
                batch_total, batch_count = token_nll(logits, labels)
            total, count = total + batch_total, count + batch_count
            del logits
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("No reference tokens to score: every reference is empty after tokenization.")
    return total / count, count

"""A small evaluation of a trained model on labelled rows: loss, perplexity and exact match.

``lorakit eval RUN DATA`` uses :func:`evaluate_rows`; it is deliberately one function with a plain dict
result so a fuller metrics module can replace it behind the same call.

- **loss / perplexity**: teacher-forced cross-entropy on the reply tokens (and their end-of-turn), with the
  prompt rendered and masked exactly as in training;
- **exact match**: the greedy reply to the prompt equals the reference reply after normalisation (surrounding
  whitespace and trailing ``.`` removed, case and runs of whitespace ignored).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lorakit.errors import DataError

if TYPE_CHECKING:
    from lorakit.inference import InferenceModel

__all__ = ["evaluate_rows", "normalize_answer"]


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace collapsed, surrounding whitespace and trailing full stops removed."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def _conversations(rows: Sequence[Mapping[str, Any]], label: str) -> list[list[dict[str, Any]]]:
    from lorakit.data import detect_format, to_messages

    conversations = []
    for index, row in enumerate(rows):
        messages = to_messages(dict(row), detect_format(list(row)), row_index=index, source_name=label)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{label}, row {index}: evaluation needs a reference reply (output / completion / a final "
                "assistant message); this row has none."
            )
        conversations.append(messages)
    return conversations


def evaluate_rows(
    model: InferenceModel,
    rows: Sequence[Mapping[str, Any]] | str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 1024,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and exact match of ``model`` on rows with reference replies.

    Args:
        model: a loaded :class:`lorakit.InferenceModel`.
        rows: data rows (any format lorakit trains on) or a data file path.
        batch_size: rows per forward pass / generation batch.
        max_new_tokens: generation budget per reply for exact match.
        max_length: longest sequence scored for the loss (longer ones are cut as in training).
        adapter: which loaded adapter to evaluate.

    Returns:
        ``{"rows", "loss", "perplexity", "exact_match", "scored_tokens", "predictions"}``.
    """
    import torch

    from lorakit.data import encode
    from lorakit.progress import progress

    label = "the evaluation rows"
    if isinstance(rows, str):
        from lorakit.data.load import load_rows

        rows, label = load_rows(rows)
    conversations = _conversations(rows, label)
    name = model._resolve_adapter(adapter)
    template = model.template_for(name)
    encoded = [encode(c, template, model.tokenizer, max_length=max_length) for c in conversations]
    pad = model.tokenizer.pad_token_id
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(encoded), batch_size)
    for start in progress(batches, total=len(batches), desc="loss", unit="batch"):
        batch = encoded[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        with model._lock, model._active(name), torch.inference_mode():
            device = next(model.model.parameters()).device
            logits = model.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).cpu(), labels[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(losses)
        total_tokens += int((labels[:, 1:] != -100).sum())
    from lorakit.inference import _Conversation

    prompts = [_Conversation(c[:-1]) for c in conversations]
    predictions: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in progress(batches, total=len(batches), desc="generate", unit="batch"):
        chunk: Any = prompts[start : start + batch_size]
        out = model.generate(chunk, max_new_tokens=max_new_tokens, adapter=name)
        predictions.extend(out)  # type: ignore[arg-type]
    hits = sum(
        normalize_answer(p) == normalize_answer(c[-1]["content"])
        for p, c in zip(predictions, conversations, strict=True)
    )
    loss = total_nll / total_tokens if total_tokens else float("nan")
    return {
        "rows": len(conversations),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)) if total_tokens else float("nan"),
        "exact_match": hits / len(conversations),
        "scored_tokens": total_tokens,
        "predictions": predictions,
    }

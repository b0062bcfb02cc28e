"""Collators: they only pad (or concatenate). Labels are made, once, in :mod:`lorakit.data`.

- :class:`PadCollator`: right-pads ``input_ids`` with the pad token, ``labels`` with ``-100`` and builds the
  ``attention_mask``. Padding is by position, so a pad token equal to EOS never masks a real EOS.
- :class:`PaddingFreeCollator`: concatenates the batch into one row with per-example ``position_ids``
  (restarting at 0 for every example, from a packed row's ``seq_lengths``) and no attention mask.
  transformers turns position resets into a block-diagonal causal mask (sdpa / eager, on CPU too) or
  variable-length kernels (flash attention), so examples never attend to each other. It serves packed rows
  (``with_dataset(packing=True)``) and unpacked ones (``with_training(padding_free=True)``) alike.

Example:
    >>> PaddingFreeCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7],
    ...                                       "seq_lengths": [2, 1]}])["position_ids"].tolist()
    [[0, 1, 0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from lorakit.data.encode import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "PadCollator", "PaddingFreeCollator"]


@attrs.frozen
class PadCollator:
    """Right-pad a batch of ``{"input_ids", "labels"}`` rows to the longest row."""

    pad_token_id: int
    """The id written into padded positions of ``input_ids``."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this (e.g. 8 for tensor cores)."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``input_ids``, ``labels`` and ``attention_mask`` tensors of shape ``(batch, length)``."""
        import torch

        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@attrs.frozen
class PaddingFreeCollator:
    """Concatenate a batch into one ``(1, total)`` row with ``position_ids`` that restart per example.

    A row may hold several packed examples (``seq_lengths``, see :func:`lorakit.data.pack`); a row without
    ``seq_lengths`` is one example. The first label of every example becomes ``-100`` (padded, it is shifted
    out of the loss; concatenated, it would be predicted from the previous example's last token), so the loss
    is the padded batch's loss exactly; :func:`lorakit.data.pack` already did it inside packed rows.
    """

    pad_token_id: int
    """Unused by the concatenation; kept so both collators are built the same way."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``input_ids``, ``labels`` and ``position_ids`` tensors of shape ``(1, total)``, and ``use_cache=False``."""
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in examples:
            ids = list(example["input_ids"])
            lengths = list(example.get("seq_lengths") or [len(ids)])
            if sum(lengths) != len(ids):
                raise ValueError(
                    f"seq_lengths {lengths} do not add up to the row's {len(ids)} tokens; rebuild the data "
                    "with lorakit.data.prepare_data(..., packing=True)."
                )
            start = len(labels)
            input_ids.extend(ids)
            labels.extend(example["labels"])
            for length in lengths:
                if length:  # nothing predicts an example's first token from another example
                    labels[start] = IGNORE_INDEX
                positions.extend(range(length))
                start += length
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            # transformers only derives the per-example mask from position_ids without a KV cache; a model in
            # eval mode would otherwise create one and let examples attend to each other.
            "use_cache": False,
        }

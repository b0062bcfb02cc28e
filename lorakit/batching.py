"""Batching and throughput accounting for ``train()``.

Length-grouped batches (:func:`grouped_indices`): rows are shuffled (seeded), cut into windows of
``window_batches`` batches, sorted by length inside each window and cut into batches; the batches are then
shuffled, the one with the longest row first (an out-of-memory error shows at step 1, not hours later). Each
batch holds rows of similar length, so dynamic padding computes few pad tokens while the order of batches stays
random. Padding is masked, so each batch's loss is exactly the loss of its rows trained unpadded; only which
rows share a batch changes. Chosen by measurement against padding-free packing on the CPU: see
``docs/benchmarks.md``.

Token counting (:func:`token_counts`, called by :class:`lorakit.trainer.LorakitTrainer`): every training
micro-batch is counted once, when it is trained, on every process:

- ``tokens``: real tokens (``attention_mask.sum()``; a padding-free batch has no padding: all its tokens);
- ``computed_tokens``: every position the model computed, padding included (``input_ids.numel()``);
- ``loss_tokens``: positions that carry loss (labels other than ``-100`` after the one-token shift).

Counting in the collator would be wrong: the data loader fetches one batch ahead, and evaluation uses the same
collator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lorakit.data.encode import IGNORE_INDEX

__all__ = ["GroupedSampler", "grouped_indices", "token_counts"]

WINDOW_BATCHES = 64
"""Batches sorted together: large enough that neighbours in length share a batch, small enough to mix."""


def token_counts(inputs: dict[str, Any]) -> tuple[int, int, int]:
    """``(tokens, computed_tokens, loss_tokens)`` of one collated batch (see the module docstring)."""
    input_ids = inputs["input_ids"]
    computed = int(input_ids.numel())
    mask = inputs.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else computed
    labels = inputs.get("labels")
    loss_tokens = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
    return tokens, computed, loss_tokens


def grouped_indices(
    lengths: Sequence[int], batch_size: int, *, seed: int, window_batches: int = WINDOW_BATCHES
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` slices have similar lengths.

    Example:
        >>> order = grouped_indices([5, 100, 6, 101, 7, 99], batch_size=3, seed=0)
        >>> sorted(sorted([5, 100, 6, 101, 7, 99][i] for i in order[k : k + 3]) for k in (0, 3))
        [[5, 6, 7], [99, 100, 101]]
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(1, window_batches) * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (-lengths[i], i))
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return [i for batch in batches for i in batch]


class GroupedSampler:
    """A ``torch`` sampler over :func:`grouped_indices`, re-shuffled each epoch (seed + epoch).

    Every process of a distributed run draws the same order; accelerate hands each one its own batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate / the Trainer at the start of each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = grouped_indices(self.lengths, self.batch_size, seed=self.seed + self.epoch)
        self.epoch += 1
        return iter(order)

"""``Pipeline.preview()``: tokenized examples with the trained tokens highlighted."""

from __future__ import annotations

import html
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.data.encode import IGNORE_INDEX

__all__ = ["Preview", "PreviewExample", "preview_examples"]

_ON, _OFF = "\x1b[1;32m", "\x1b[0m"


@attrs.frozen
class PreviewExample:
    """One example as ``(text, trained)`` pieces, decoded token run by token run."""

    pieces: tuple[tuple[str, bool], ...]
    """The decoded text of each run of trained / untrained tokens, in order."""
    n_tokens: int
    """Tokens in the example."""
    n_trained: int
    """Tokens that carry loss."""

    def text(self, *, color: bool = False) -> str:
        """The example; trained text in green (``color=True``) or between ``[[`` and ``]]``."""
        start, end = (_ON, _OFF) if color else ("[[", "]]")
        return "".join(f"{start}{text}{end}" if trained else text for text, trained in self.pieces)


@attrs.frozen(repr=False)
class Preview:
    """The first training examples as the model sees them. ``str()`` for a terminal, HTML in a notebook."""

    examples: tuple[PreviewExample, ...]
    """The examples shown."""

    def render(self, *, color: bool | None = None) -> str:
        """Plain text; ``color=None`` colours only when stdout is a terminal (and ``NO_COLOR`` is unset)."""
        if color is None:
            color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        legend = "trained tokens in green" if color else "trained tokens between [[ and ]]"
        blocks = [f"lorakit preview: {len(self.examples)} example(s), {legend}"]
        for index, example in enumerate(self.examples):
            blocks.append(
                f"--- example {index}: {example.n_tokens} tokens, {example.n_trained} trained ---\n"
                + example.text(color=color)
            )
        return "\n".join(blocks)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:  # what a REPL shows for ``pipeline.preview()``
        return self.render()

    def _repr_html_(self) -> str:
        parts = [
            "<div class='lorakit-preview'><p>Trained tokens are "
            "<mark style='background:#b7f0b1'>highlighted</mark>.</p>"
        ]
        for index, example in enumerate(self.examples):
            body = "".join(
                f"<mark style='background:#b7f0b1'>{html.escape(text)}</mark>"
                if trained
                else html.escape(text)
                for text, trained in example.pieces
            )
            parts.append(
                f"<p><b>example {index}</b>: {example.n_tokens} tokens, {example.n_trained} trained</p>"
                f"<pre style='white-space:pre-wrap'>{body}</pre>"
            )
        return "".join(parts) + "</div>"


def preview_examples(rows: Sequence[dict[str, Any]], tokenizer: Any) -> Preview:
    """A :class:`Preview` of tokenized rows (``input_ids`` and ``labels``)."""
    examples = []
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        pieces: list[tuple[str, bool]] = []
        start = 0
        for index in range(1, len(ids) + 1):
            if index == len(ids) or (labels[index] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
                text = tokenizer.decode(ids[start:index], skip_special_tokens=False)
                pieces.append((text, labels[start] != IGNORE_INDEX))
                start = index
        examples.append(
            PreviewExample(
                pieces=tuple(pieces),
                n_tokens=len(ids),
                n_trained=sum(label != IGNORE_INDEX for label in labels),
            )
        )
    return Preview(tuple(examples))

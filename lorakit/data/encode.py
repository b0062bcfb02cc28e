"""Token ids and labels: each template piece tokenized on its own, assistant pieces trained.

Tokenizing the pieces separately (``add_special_tokens=False``) makes the split between prompt and reply
exact, and :func:`encode_prompt` renders inference prompts the same way, so a prompt at generation time is
token for token the prompt the model saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.data.formats import TEXT_ROLE
from lorakit.errors import ConfigError
from lorakit.templates import get_template
from lorakit.templates.base import Message, PromptTemplate, Segment, adds_bos, merge_segments

__all__ = ["IGNORE_INDEX", "OVERFLOW_POLICIES", "Encoded", "Encoder", "encode", "encode_prompt"]

IGNORE_INDEX = -100
"""The label of a token that carries no loss (PyTorch's ``cross_entropy`` default ``ignore_index``).

This is its one home: every other module (collators, trainer, evaluation, methods) imports it from here
(``from lorakit.data.encode import IGNORE_INDEX``, or ``lorakit.data.IGNORE_INDEX``) instead of spelling -100.
"""

_BATCH = 1024

OVERFLOW_POLICIES = ("truncate_prompt", "truncate", "drop", "error")
"""What to do with an example longer than ``max_length`` (see :func:`encode`)."""


@attrs.frozen
class Encoded:
    """One tokenized conversation."""

    input_ids: list[int]
    """Token ids, BOS first when the tokenizer adds one by default."""
    labels: list[int]
    """``input_ids`` where trained, :data:`IGNORE_INDEX` elsewhere (not shifted: the model shifts)."""
    truncated: bool = False
    """Tokens were cut to fit ``max_length``."""
    reply_cut: bool = False
    """The final reply itself did not fit and lost its end (its EOS / end-of-turn is not trained)."""
    n_prompt_tokens: int = 0
    """Kept tokens that the template does not train (prompt, headers, BOS)."""
    n_trained_tokens: int = 0
    """Tokens that carry loss (labels other than :data:`IGNORE_INDEX`)."""
    length_before: int = 0
    """Tokens before any cut."""
    overflow: bool = False
    """Longer than ``max_length`` under ``on_overflow="drop"`` / ``"error"``: not cut, to be dropped / raised."""
    spans: tuple[tuple[int, int], ...] = ()
    """``(start, end)`` of each run of tokens the template trains (assistant replies with their end-of-turn),
    after cutting; independent of ``train_on_inputs``."""
    end_cut: bool = False
    """The end of the sequence was cut away (the last span, if it reached the end, lost its end-of-turn)."""

    @property
    def has_trainable_tokens(self) -> bool:
        """False when no label survived; such a row teaches nothing and is dropped by ``prepare_data``."""
        return self.n_trained_tokens > 0


class Encoder:
    """Tokenizes rendered segments for one tokenizer; BOS behaviour is detected once.

    Args:
        tokenizer: a ``transformers`` tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos_id: int | None = tokenizer.bos_token_id
        self.adds_bos = adds_bos(tokenizer)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added."""
        ids: list[list[int]] = []
        for start in range(0, len(texts), _BATCH):
            ids.extend(self.tokenizer(texts[start : start + _BATCH], add_special_tokens=False)["input_ids"])
        return ids

    def join(
        self, segments: Sequence[Segment], token_lists: Sequence[list[int]]
    ) -> tuple[list[int], list[bool]]:
        """Concatenate the segments' tokens, with BOS first if the tokenizer adds it and it is not there."""
        ids: list[int] = []
        trained: list[bool] = []
        for (_, is_trained), tokens in zip(segments, token_lists, strict=True):
            ids.extend(tokens)
            trained.extend([is_trained] * len(tokens))
        if self.adds_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
            trained.insert(0, False)
        return ids, trained

    def encode_many(
        self,
        conversations: Sequence[Sequence[Message]],
        template: PromptTemplate,
        *,
        max_length: int,
        train_on_inputs: bool = False,
        on_overflow: str = "truncate_prompt",
    ) -> list[Encoded]:
        """:func:`encode` for many conversations, tokenizing in batches."""
        rendered = [self.render(c, template) for c in conversations]
        flat = self.tokenize([text for segments in rendered for text, _ in segments])
        encoded = []
        offset = 0
        for segments in rendered:
            ids, trained = self.join(segments, flat[offset : offset + len(segments)])
            offset += len(segments)
            encoded.append(
                self.fit(
                    ids,
                    trained,
                    max_length=max_length,
                    train_on_inputs=train_on_inputs,
                    on_overflow=on_overflow,
                )
            )
        return encoded

    def render(self, messages: Sequence[Message], template: PromptTemplate) -> list[Segment]:
        """The template's segments; a ``text`` row (continued pre-training) is all trained, EOS appended."""
        if len(messages) == 1 and messages[0].get("role") == TEXT_ROLE:
            return [(messages[0]["content"] + (self.tokenizer.eos_token or ""), True)]
        return merge_segments(template.render(messages, tokenizer=self.tokenizer))

    def fit(
        self,
        ids: list[int],
        trained: list[bool],
        *,
        max_length: int,
        train_on_inputs: bool,
        on_overflow: str = "truncate_prompt",
    ) -> Encoded:
        """Cut to ``max_length`` and make the labels (see :func:`encode` for the policies)."""
        total = len(ids)
        truncated = reply_cut = overflow = end_cut = False
        if total > max_length and on_overflow in ("drop", "error"):
            overflow = True
        elif total > max_length:
            truncated = True
            head = 1 if self.bos_id is not None and ids[0] == self.bos_id else 0
            reply_start = total
            if any(trained):
                reply_start = max(i for i, t in enumerate(trained) if t)
                while reply_start > 0 and trained[reply_start - 1]:
                    reply_start -= 1
            budget = max_length - head
            if on_overflow == "truncate_prompt" and total - reply_start <= budget:
                # the final reply fits: drop the oldest prompt tokens
                keep = list(range(head)) + list(range(total - budget, total))
            else:  # "truncate", or the final reply alone is too long: keep the start, cut the end
                keep = list(range(max_length))
                end_cut = True
                reply_cut = any(trained[max_length:])
            ids = [ids[i] for i in keep]
            trained = [trained[i] for i in keep]
        if train_on_inputs:
            labels = list(ids)
        else:
            labels = [token if t else IGNORE_INDEX for token, t in zip(ids, trained, strict=True)]
        return Encoded(
            input_ids=ids,
            labels=labels,
            truncated=truncated,
            reply_cut=reply_cut,
            n_prompt_tokens=trained.count(False),
            n_trained_tokens=sum(label != IGNORE_INDEX for label in labels),
            length_before=total,
            overflow=overflow,
            spans=_runs(trained),
            end_cut=end_cut,
        )


def encode(
    messages: Sequence[Message],
    template: PromptTemplate,
    tokenizer: Any,
    *,
    max_length: int,
    train_on_inputs: bool = False,
    on_overflow: str = "truncate_prompt",
) -> Encoded:
    """Tokenize one conversation for training, with labels only on the assistant replies.

    Each rendered piece is tokenized with ``add_special_tokens=False`` and the pieces are concatenated; BOS
    goes first when the tokenizer adds it by default (unless the template already wrote it).

    Longer than ``max_length``, by ``on_overflow``:

    - ``"truncate_prompt"`` (default): the oldest tokens after BOS are cut, so the final reply survives; if
      the final reply alone does not fit, the start of the sequence is kept and the reply loses its end
      (``reply_cut=True``);
    - ``"truncate"``: the first ``max_length`` tokens are kept;
    - ``"drop"`` / ``"error"``: nothing is cut; ``overflow=True`` and :func:`lorakit.data.prepare_data` drops
      the row (counted) or raises DataError naming it.

    A cut sets ``truncated=True``; when no trained token is left, ``has_trainable_tokens`` is False (and
    ``prepare_data`` drops and counts the row: it is never trained silently).

    Args:
        messages: the conversation (see :func:`lorakit.data.to_messages`).
        template: a prompt template (see :mod:`lorakit.templates`).
        tokenizer: a ``transformers`` tokenizer.
        max_length: the longest sequence to return.
        train_on_inputs: put labels on every token, prompt included.
        on_overflow: ``"truncate_prompt"``, ``"truncate"``, ``"drop"`` or ``"error"`` (see above).

    Example:
        >>> row = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        ...              get_template("chatml"), tokenizer, max_length=512)
        >>> tokenizer.decode([t for t in row.labels if t != IGNORE_INDEX])
        'Hello<|im_end|>'
    """
    _check_max_length(max_length)
    check_overflow(on_overflow)
    return Encoder(tokenizer).encode_many(
        [messages],
        get_template(template),
        max_length=max_length,
        train_on_inputs=train_on_inputs,
        on_overflow=on_overflow,
    )[0]


def encode_prompt(messages: Sequence[Message], template: PromptTemplate, tokenizer: Any) -> list[int]:
    """Token ids of a generation prompt: the conversation so far, ending with the assistant header.

    Rendered with ``add_generation_prompt=True`` and tokenized exactly like :func:`encode`, so these ids equal
    the prompt part of the training encoding of the same conversation with a reply appended.
    """
    encoder = Encoder(tokenizer)
    segments = merge_segments(
        get_template(template).render(messages, tokenizer=tokenizer, add_generation_prompt=True)
    )
    ids, _ = encoder.join(segments, encoder.tokenize([text for text, _ in segments]))
    return ids


def check_overflow(on_overflow: Any) -> None:
    """Raise ConfigError unless ``on_overflow`` is one of :data:`OVERFLOW_POLICIES`."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(
            f"`on_overflow` must be one of {', '.join(repr(p) for p in OVERFLOW_POLICIES)}, got {on_overflow!r}."
        )


def _runs(flags: list[bool]) -> tuple[tuple[int, int], ...]:
    runs = []
    start = None
    for index, flag in enumerate(flags):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(flags)))
    return tuple(runs)


def _check_max_length(max_length: Any) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"`max_length` must be a positive integer, got {max_length!r}. Use e.g. 1024.")

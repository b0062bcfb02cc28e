"""Generation options and the text post-processing shared by ``generate``, ``stream`` and ``chat``.

:class:`Sampling` validates the decoding options once; :class:`StopCutter` turns a stream of decoded chunks
into the same text ``generate`` returns (cut at the first stop string, surrounding whitespace stripped),
holding back only as many characters as a stop string could still need.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from lorakit.errors import ConfigError

__all__ = ["Sampling", "StopCutter", "cut_at_stops", "prompt_learning_generation"]


def _check_number(
    name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high != math.inf:
            bound += f" and <= {high:g}"
        raise ConfigError(f"`{name}` must be a number {bound}, got {value!r}.")


@attrs.frozen
class Sampling:
    """Decoding options; ``temperature=0`` (the default) is greedy decoding and ignores the others."""

    max_new_tokens: int = 256
    """Most tokens to generate per prompt."""
    temperature: float = 0.0
    """0 for greedy decoding; > 0 samples from the softmax at this temperature."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to ``top_p``."""
    top_k: int | None = None
    """Keep only the ``top_k`` most likely tokens (0 or None: no limit)."""
    repetition_penalty: float | None = None
    """> 1 discourages repeating tokens (CTRL's penalty)."""
    seed: int | None = None
    """Seed the sampler for reproducible samples."""
    stop: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: (v,) if isinstance(v, str) else tuple(v)
    )
    """Extra strings that end a reply, besides the template's own end-of-turn markers."""

    def __attrs_post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens <= 0
        ):
            raise ConfigError(f"`max_new_tokens` must be positive, got {self.max_new_tokens}.")
        _check_number("temperature", self.temperature, low=0.0)
        if self.top_p is not None:
            _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ConfigError(f"`top_k` must be a non-negative integer, got {self.top_k!r}.")
        if self.repetition_penalty is not None:
            _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"`seed` must be an integer, got {self.seed!r}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"`stop` must be a non-empty string or a list of them, got {self.stop!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for these options (stop tokens are added by the caller)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if self.greedy:
            # Unset the checkpoint's own sampling defaults, which would warn under greedy decoding.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs["temperature"] = self.temperature
            kwargs["top_p"] = self.top_p
            kwargs["top_k"] = self.top_k if self.top_k else None
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string, whitespace stripped at both ends."""
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut].strip()


class StopCutter:
    """Feed decoded chunks, get back the chunks of ``cut_at_stops(whole text)``, as early as possible.

    A chunk is held back only while its end could still be the start of a stop string, or while it is
    trailing whitespace (which ``generate`` strips). After a stop string is seen, everything is dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.started = False
        self.done = False

    def feed(self, chunk: str) -> str:
        """Text that is now certain to be part of the reply."""
        if self.done or not chunk:
            return ""
        self.pending += chunk
        if not self.started:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return ""
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.done = True
            out, self.pending = self.pending[:cut].rstrip(), ""
            self.started = self.started or bool(out)
            return out
        keep = 0
        for stop in self.stops:  # the longest tail that is a proper prefix of a stop string
            for size in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if stop.startswith(self.pending[-size:]):
                    keep = size
                    break
        safe = self.pending[: len(self.pending) - keep]
        stripped = safe.rstrip()
        out = stripped
        self.pending = safe[len(stripped) :] + self.pending[len(safe) :]
        if out:
            self.started = True
        return out

    def finish(self) -> str:
        """What is left at the end of generation (trailing whitespace dropped)."""
        if self.done:
            return ""
        out, self.pending = self.pending.rstrip(), ""
        self.done = True
        return out if self.started or out.strip() else ""

    def cut(self, chunks: Iterable[str]) -> Iterator[str]:
        """Apply :meth:`feed` to each chunk and :meth:`finish` at the end, yielding non-empty pieces."""
        for chunk in chunks:
            piece = self.feed(chunk)
            if piece:
                yield piece
            if self.done:
                return
        tail = self.finish()
        if tail:
            yield tail


def _virtual_token_positions(model: Any, inputs: dict[str, Any]) -> None:
    """Position ids that count the virtual tokens and skip left padding, as in (right-padded) training.

    PEFT drops position ids for adapters that prepend virtual-token embeddings, so the model numbers every
    position from 0, pads included: a left-padded prompt in a batch would then see other positions than
    alone. Counting the attention mask (virtual tokens included) gives each prompt the positions it trained on.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return
    if str(getattr(config.peft_type, "value", config.peft_type)) in ("PREFIX_TUNING", "CARTRIDGE"):
        return  # PEFT offsets the positions of prefix methods itself
    mask = inputs.get("attention_mask")
    embeds = inputs.get("inputs_embeds")
    current = embeds if embeds is not None else inputs.get("input_ids")
    if mask is None or current is None or getattr(mask, "ndim", 0) != 2:
        return
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    inputs["position_ids"] = positions[:, -current.shape[1] :]


@contextlib.contextmanager
def prompt_learning_generation(model: Any) -> Iterator[None]:
    """Make ``model.generate`` of a PEFT prompt-learning adapter use the KV cache correctly; call around it.

    PEFT (0.21) finds the KV cache of a generation step under ``past_key_values``; transformers 5 renamed that
    key to ``cache``. Without this bridge PEFT never sees the cache, so it re-inserts the virtual tokens at every
    step (prompt tuning, P-tuning: wrong tokens after the first) and its prefix key/values are ignored in favour
    of the generation cache (prefix tuning, P-tuning v2: the adapter has no effect at all). Here PEFT's
    ``prepare_inputs_for_generation`` sees the cache under its old name and the model gets it back under the
    new one. A no-op for models that are not PEFT models or whose forward still takes ``past_key_values``.
    """
    peft_prepare = getattr(model, "prepare_inputs_for_generation", None)
    base_prepare = getattr(model, "base_model_prepare_inputs_for_generation", None)
    get_base = getattr(model, "get_base_model", None)
    if peft_prepare is None or base_prepare is None or get_base is None:
        yield
        return
    if "cache" not in inspect.signature(get_base().forward).parameters:
        yield
        return

    def base_with_old_name(*args: Any, **kwargs: Any) -> Any:
        inputs = base_prepare(*args, **kwargs)
        cache = inputs.pop("cache", None)
        if inputs.get("use_cache") is False:
            # Without caching the model still hands back the prefix cache it was given (now holding the step's
            # keys too); PEFT must build a fresh prefix for the next full forward.
            cache = None
        if cache is not None:
            inputs["past_key_values"] = cache
        return inputs

    def peft_with_new_name(*args: Any, **kwargs: Any) -> Any:
        model.base_model_prepare_inputs_for_generation = base_with_old_name
        try:
            with warnings.catch_warnings():  # repeated every step; positions are set below instead
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                inputs = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        _virtual_token_positions(model, inputs)
        return inputs

    had_own = "prepare_inputs_for_generation" in vars(model)
    model.prepare_inputs_for_generation = peft_with_new_name  # PeftModel.generate installs this one
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = peft_prepare
        else:
            del model.prepare_inputs_for_generation

"""The one generation loop: batched (:func:`generate_texts`) and streaming (:func:`stream_text`).

``InferenceModel.generate`` / ``stream`` / ``chat``, ``lorakit.evaluate`` (and so ``lorakit eval`` and the
quickstart), the in-training evaluator and the sample-logging callback all generate through here:

- prompts are token ids, left-padded into a batch (with greedy decoding each reply equals the one generated
  alone);
- :class:`Decoding` holds everything else one call needs: the ``model.generate`` arguments (from
  :class:`Sampling` plus caller extras), the stop strings and the stop token ids;
- :func:`run_generate` is the single ``model.generate`` call: the model in eval mode (its mode restored
  after), :func:`prompt_learning_generation` around it so prompt-based adapters use the KV cache correctly,
  ``torch.inference_mode``, and the randomness of :mod:`lorakit.rng`: the call runs inside
  :func:`lorakit.rng.forked_rng` seeded with ``Decoding.seed`` (a fresh random seed when None), so the caller's
  global RNG state is the same after the call, and the same seed gives the same text;
- replies are cut at the first stop token, decoded without special tokens and cut at the first stop string
  (:func:`cut_at_stops`; :class:`StopCutter` does the same to a stream, chunk by chunk).

A *session* (:data:`Session`) is entered around each ``model.generate`` call and yields the model to use:
:func:`fixed` for a plain model, ``InferenceModel`` holds its lock and activates the adapter there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import attrs

from lorakit.errors import ConfigError
from lorakit.progress import progress
from lorakit.rng import forked_rng, generator

__all__ = [
    "ContinuousBatch",
    "Decoding",
    "Row",
    "Sampling",
    "Session",
    "StopCutter",
    "cut_at_stops",
    "fixed",
    "generate_rows",
    "generate_texts",
    "prompt_learning_generation",
    "run_generate",
    "stop_token_ids",
    "stream_text",
]


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
    """Seed the sampler for reproducible samples (None: a fresh random seed; the global RNG is never used)."""
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


# --- the generation loop --------------------------------------------------------------------------------

Session = Callable[[], AbstractContextManager[Any]]
"""Entered around each ``model.generate`` call; yields the model to generate with."""


def fixed(model: Any) -> Session:
    """The session of a plain model: nothing to lock or switch."""
    return lambda: contextlib.nullcontext(model)


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """The tokenizer's EOS token and every stop string that is a single token: generation ends at these."""
    ids = [tokenizer.eos_token_id]
    for stop in stops:
        tokens = tokenizer.encode(stop, add_special_tokens=False)
        if len(tokens) == 1 and tokens[0] not in ids:
            ids.append(tokens[0])
    return [i for i in ids if i is not None]


@attrs.frozen
class Decoding:
    """Everything one generation call needs besides the prompts; build it with :meth:`build`."""

    kwargs: dict[str, Any]
    """Keyword arguments of ``model.generate`` (sampling options, stop tokens, pad token, caller extras)."""
    stops: tuple[str, ...]
    """Stop strings: the reply is cut at the first one."""
    eos_ids: tuple[int, ...]
    """Stop token ids: the reply ends before the first one."""
    pad_token_id: int
    """Left padding of a batch (the tokenizer's pad token, else the first stop token)."""
    seed: int | None = None
    """Seed of the call's sampling; None draws a fresh random seed (the global RNG is never used)."""

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        stops: Sequence[str],
        sampling: Sampling,
        extra: Mapping[str, Any] | None = None,
    ) -> Decoding:
        """The decoding of ``sampling`` with the template's end-of-turn ``stops`` (and ``sampling.stop``).

        Stop strings of one token end generation by token id; longer ones by transformers' ``stop_strings``.
        ``extra`` keyword arguments go to ``model.generate`` last (they win).
        """
        every_stop = tuple(dict.fromkeys([*stops, *sampling.stop]))
        eos_ids = stop_token_ids(tokenizer, every_stop)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        kwargs = {**sampling.generate_kwargs(), "eos_token_id": eos_ids, "pad_token_id": pad}
        multi = [s for s in every_stop if len(tokenizer.encode(s, add_special_tokens=False)) > 1]
        if multi:
            kwargs.update(stop_strings=multi, tokenizer=tokenizer)
        kwargs.update(extra or {})
        return cls(kwargs, every_stop, tuple(eos_ids), pad, sampling.seed)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, its train / eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_generate(model: Any, prompts: Sequence[Sequence[int]], decoding: Decoding, **extra: Any) -> Any:
    """The one ``model.generate`` call: left-padded ``prompts`` -> the output ids (prompt columns included).

    The model runs in eval mode, under ``torch.inference_mode`` and :func:`prompt_learning_generation`, inside
    :func:`lorakit.rng.forked_rng` seeded with ``decoding.seed`` (or a fresh seed): the global RNG state is the
    same after the call. ``extra`` keyword arguments (a streamer, stopping criteria) go to ``model.generate``.

    transformers samples from the global torch RNG (``model.generate`` takes no generator), so the state is
    forked rather than replaced by a ``torch.Generator``; the state is process-wide, so another thread drawing
    from it during the call finds it restored afterwards.
    """
    import torch

    width = max(len(ids) for ids in prompts)
    pad = decoding.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    seed = decoding.seed if decoding.seed is not None else generator(None).initial_seed()
    with _eval_mode(model), prompt_learning_generation(model), torch.inference_mode(), forked_rng():
        torch.manual_seed(seed)
        return model.generate(input_ids=input_ids, attention_mask=attention, **{**decoding.kwargs, **extra})


def decode_replies(tokenizer: Any, output: Any, width: int, decoding: Decoding) -> list[str]:
    """The reply texts of a ``model.generate`` output whose prompt columns are the first ``width``."""
    texts = []
    for row in output[:, width:].tolist():
        ended = next((i for i, token in enumerate(row) if token in decoding.eos_ids), len(row))
        text = tokenizer.decode(row[:ended], skip_special_tokens=True)
        texts.append(cut_at_stops(text, decoding.stops))
    return texts


def generate_texts(
    session: Session,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    *,
    batch_size: int | None = None,
    desc: str | None = None,
) -> list[str]:
    """The replies to tokenized prompts, ``batch_size`` at a time (all at once when None), in order.

    Only the decoded strings are kept between batches, so memory grows with the batch, not the prompts.
    ``desc`` shows a progress bar with that label (off with ``LORAKIT_PROGRESS=0``).
    """
    size = batch_size or max(len(prompts), 1)
    starts: Iterable[int] = range(0, len(prompts), size)
    if desc is not None:
        starts = progress(starts, total=-(-len(prompts) // size), desc=desc, unit="batch")
    texts: list[str] = []
    for start in starts:
        batch = [list(ids) for ids in prompts[start : start + size]]
        with session() as model:
            output = run_generate(model, batch, decoding)
        texts.extend(decode_replies(tokenizer, output, max(len(ids) for ids in batch), decoding))
        del output
    return texts


def stream_text(session: Session, tokenizer: Any, prompt: Sequence[int], decoding: Decoding) -> Iterator[str]:
    """The reply to one tokenized prompt as text chunks, as they are generated.

    The chunks join to what :func:`generate_texts` returns for the same prompt. Generation starts at once in a
    background thread (transformers' ``TextIteratorStreamer``), which enters ``session``; leaving the loop
    early stops it at its next token. An error in the thread is raised in the consumer's.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            import torch

            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

    kwargs = dict(decoding.kwargs)
    criteria = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []), _Cancelled()])
    decoding = attrs.evolve(decoding, kwargs=kwargs)

    def work() -> None:
        try:
            with session() as model:
                run_generate(model, [prompt], decoding, streamer=streamer, stopping_criteria=criteria)
        finally:
            streamer.end()  # wakes the consumer when generation fails too (a second end is never read)

    # The Future keeps whatever the worker raised; the consumer's thread raises it.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-stream")
    future = executor.submit(work)
    executor.shutdown(wait=False)

    def chunks() -> Iterator[str]:
        try:
            yield from StopCutter(decoding.stops).cut(streamer)
        finally:
            cancel.set()  # the worker stops at its next token (its queue is unbounded: it never blocks)
            error = future.exception()  # waits for the worker to finish
        if error is not None:
            raise error

    return chunks()


# --- several requests in one batch (the server) ---------------------------------------------------------


class Row:
    """One prompt of a :func:`generate_rows` batch with its own decoding, adapter and text callback.

    Each row stops on its own: at one of its stop tokens, at its stop strings, after its ``max_new_tokens``,
    or when :meth:`cancel` is called (a client that went away). Sampled rows (``temperature > 0``) draw from
    their own ``torch.Generator`` seeded with ``decoding.seed``, so a seeded reply does not depend on the other
    rows of the batch. ``on_text`` receives the reply's text chunks as they are certain (the chunks join to
    :attr:`text`, which equals what :func:`generate_texts` returns for the prompt under greedy decoding);
    ``on_done`` is called once when the row is done (before the rest of the batch is). ``logit_bias`` adds
    to the scores of those token ids before the row picks its token (OpenAI's ``logit_bias``).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt: Sequence[int],
        decoding: Decoding,
        *,
        adapter: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Row], None] | None = None,
        logit_bias: Mapping[int, float] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.on_done = on_done
        self.logit_bias = dict(logit_bias or {})
        self.prompt = list(prompt)
        self.decoding = decoding
        self.adapter = adapter
        self.on_text = on_text
        self.max_new_tokens = int(decoding.kwargs.get("max_new_tokens", 256))
        self.tokens: list[int] = []
        """Generated token ids, the one that ended the reply included."""
        self.finish_reason: str | None = None
        """None while generating, then ``"stop"`` (a stop token or string), ``"length"`` or ``"cancelled"``."""
        self.chunks: list[str] = []
        self._cutter = StopCutter(decoding.stops)
        self._decoded = ""
        self._cancel = threading.Event()
        self._generator: Any = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def cancel(self) -> None:
        """Stop this row at the next token (thread-safe); the others go on."""
        self._cancel.set()

    def sampler(self) -> Any:
        """This row's ``torch.Generator`` (None under greedy decoding), made on first use."""
        if self.decoding.kwargs.get("do_sample") and self._generator is None:
            seed = self.decoding.seed if self.decoding.seed is not None else generator(None).initial_seed()
            self._generator = generator(seed)
        return self._generator

    def _emit(self, piece: str) -> None:
        if piece:
            self.chunks.append(piece)
            if self.on_text is not None:
                self.on_text(piece)

    def step(self, token: int) -> None:
        """Take the next generated token: emit the text it makes certain, decide whether the row is done."""
        if self.done:
            return
        if self._cancel.is_set():
            self.finish_reason = "cancelled"
            self._finish()
            return
        self.tokens.append(token)
        ended = token in self.decoding.eos_ids
        if not ended:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
                self._emit(self._cutter.feed(text[len(self._decoded) :]))
                self._decoded = text
        if ended or self._cutter.done:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.done:
            self._finish()

    def _finish(self) -> None:
        """Emit the text still held back, then tell ``on_done`` (a cancelled row emits nothing more)."""
        if self.finish_reason != "cancelled":
            text = self.tokenizer.decode(
                [t for t in self.tokens if t not in self.decoding.eos_ids], skip_special_tokens=True
            )
            if not self._cutter.done:
                self._emit(self._cutter.feed(text[len(self._decoded) :]))
            self._emit(self._cutter.finish())
        if self.on_done is not None:
            self.on_done(self)


def _sample_rows(rows: Sequence[Row], scores: Any) -> Any:
    """Scores with each row's logit bias, under which argmax picks each sampled row's own draw."""
    import torch

    for index, row in enumerate(rows):
        for token, bias in row.logit_bias.items():
            scores[index, token] += bias
        sampler = row.sampler()
        if sampler is None or row.done:
            continue
        kwargs = row.decoding.kwargs
        logits = scores[index] / float(kwargs.get("temperature") or 1.0)
        top_k = kwargs.get("top_k")
        if top_k:
            floor = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < floor, -math.inf)
        top_p = kwargs.get("top_p")
        if top_p is not None and top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            mass = torch.softmax(ordered, -1).cumsum(-1)
            drop = mass - torch.softmax(ordered, -1) >= top_p  # keep the token that crosses top_p
            logits = logits.scatter(0, order[drop], -math.inf)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=sampler)
        scores[index] = torch.full_like(scores[index], -math.inf).scatter(0, token, 0.0)
    return scores


def generate_rows(session: Session, tokenizer: Any, rows: Sequence[Row], **extra: Any) -> None:
    """Generate ``rows`` as one left-padded batch through :func:`run_generate`; each row streams and stops
    on its own (see :class:`Row`). ``extra`` goes to ``model.generate`` (e.g. PEFT's ``adapter_names``).

    The batch runs until its longest row is done; a row that is done (or cancelled) only rides along. The
    reply of a greedy row equals the one :func:`generate_texts` generates alone for the same prompt.
    """
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class _Sampler(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return _sample_rows(rows, scores)

    class _Stops(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            import torch

            for row, token in zip(rows, input_ids[:, -1].tolist(), strict=True):
                row.step(token)
            return torch.tensor([row.done for row in rows], dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {
        **Sampling(max(row.max_new_tokens for row in rows)).generate_kwargs(),
        "eos_token_id": [tokenizer.eos_token_id],  # every row's own stop tokens end it in _Stops
        "pad_token_id": pad,
    }
    decoding = Decoding(kwargs, (), (tokenizer.eos_token_id,), pad, seed=0)
    with session() as model:
        run_generate(
            model,
            [row.prompt for row in rows],
            decoding,
            logits_processor=LogitsProcessorList([_Sampler()]),
            stopping_criteria=StoppingCriteriaList([_Stops()]),
            **extra,
        )
    for row in rows:  # generation ended by the shared budget or the shared EOS before a row saw its end
        if not row.done:
            row.finish_reason = "length" if len(row.tokens) >= row.max_new_tokens else "stop"
            row._finish()


# --- continuous batching (the server's default scheduler) -----------------------------------------------

_GENERATION_DEFAULTS_NOT_APPLIED: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}
"""``generation_config`` fields (with their neutral values) whose processors :class:`ContinuousBatch` lacks."""


def _check_continuous(model: Any) -> None:
    """Raise ``ConfigError`` when ``model`` needs what :class:`ContinuousBatch` does not do."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = getattr(model, "generation_config", None)
    for name, neutral in _GENERATION_DEFAULTS_NOT_APPLIED.items():
        value = getattr(config, name, None)
        if value not in neutral:
            raise ConfigError(
                f"Continuous batching does not apply the model's generation_config.{name}={value!r}; "
                "serve with --scheduler static."
            )
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {DynamicLayer.__name__}:
        raise ConfigError(
            f"Continuous batching needs a full-attention KV cache; this model's has {sorted(kinds)}. "
            "Serve it with --scheduler static."
        )


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ContinuousBatch:
    """Rows decoded together one token at a time: rows join between steps (:meth:`add`) and leave as soon
    as they are done (continuous, or iteration-level, batching: what ``lorakit serve`` runs by default).

    All rows share one KV cache (transformers' ``DynamicCache``), left-padded to the longest row, as in a
    left-padded ``model.generate`` batch. A joining group is prefilled on its own; its cache is padded along
    the sequence axis and concatenated along the batch axis. A done row's cache rows are dropped, and so are
    the columns only padding uses any more. Positions count each row's own tokens, as ``model.generate``
    counts them, so a greedy row's reply equals the one :func:`generate_texts` generates alone. Rows
    decode as :class:`Row` says (own stops, budget, sampler, logit bias, callbacks, cancel).
    ``adapter_name`` gives a row's PEFT adapter (``"__base__"``: none) for mixed-LoRA batches: a forward
    whose rows use several adapters passes ``adapter_names``; one whose rows all use the same one enters
    ``adapter_session(name)`` instead (the adapter active, as ``InferenceModel.generate`` runs it: PEFT's
    per-forward hooks cost a few % per step). Not thread-safe: one thread calls :meth:`add` and :meth:`step`;
    ``session`` is entered around each forward (``InferenceModel`` holds its lock there).
    """

    def __init__(
        self,
        session: Session,
        tokenizer: Any,
        *,
        adapter_name: Callable[[Row], str] | None = None,
        adapter_session: Callable[[str], Session] | None = None,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.adapter_session = adapter_session
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows: list[Row] = []
        """The rows being generated, in cache order."""
        self.steps = 0
        """Decode steps run so far (prefills not counted)."""
        self._cache: Any = None
        self._mask: Any = None  # [rows, cache columns]: 1 where a row has a real token
        self._positions: Any = None  # [rows]: the position of the token each row feeds next
        self._tokens: Any = None  # [rows]: the token each row feeds next (its last generated one)
        with session() as model:
            _check_continuous(model)
            forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
            self._keep_one = "logits_to_keep" in inspect.signature(forward).parameters

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows`` (left-padded among themselves) and take each one's first token; the rows join the
        batch. Returns the rows that are already done (they left again)."""
        import torch
        from transformers.cache_utils import DynamicCache

        rows = list(rows)
        width = max(len(row.prompt) for row in rows)
        with torch.inference_mode():
            device = self._device()
            ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=device)
            mask = torch.tensor(
                [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device
            )
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate numbers them
            session, extra = self._session_for(rows)
            with session() as model:
                cache = DynamicCache(config=model.config)
                logits = self._forward(model, extra, ids, mask, positions, cache)
            tokens = self._pick(rows, logits)
            self._merge(rows, cache, mask, positions[:, -1] + 1, tokens)
            return self._retire()

    def step(self) -> list[Row]:
        """Decode one token for every row; returns the rows that are done (they left the batch)."""
        import torch

        if not self.rows:
            return []
        with torch.inference_mode():
            mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
            session, extra = self._session_for(self.rows)
            with session() as model:
                logits = self._forward(
                    model, extra, self._tokens[:, None], mask, self._positions[:, None], self._cache
                )
            self._mask = mask
            self._positions = self._positions + 1
            self._tokens = self._pick(self.rows, logits)
            self.steps += 1
            return self._retire()

    def drop(self) -> list[Row]:
        """Remove every row (after a failed forward: the cache may be half updated); returns them."""
        rows, self.rows = self.rows, []
        self._cache = self._mask = self._positions = self._tokens = None
        return rows

    def _device(self) -> Any:
        with self.session() as model:
            return next(model.parameters()).device

    def _session_for(self, rows: list[Row]) -> tuple[Session, dict[str, Any]]:
        """The session of a forward over ``rows`` and its extra arguments (``adapter_names`` when mixed)."""
        if self.adapter_name is None:
            return self.session, {}
        names = [self.adapter_name(row) for row in rows]
        if self.adapter_session is not None and len(set(names)) == 1:
            return self.adapter_session(names[0]), {}
        return self.session, {"adapter_names": names}

    def _forward(
        self, model: Any, extra: dict[str, Any], ids: Any, mask: Any, positions: Any, cache: Any
    ) -> Any:
        """One forward with the cache; the float32 scores of each row's next token."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": positions,
            "cache": cache,
            "use_cache": True,
            **extra,
        }
        if not bool(mask.all()):  # model.generate drops an all-ones mask too
            kwargs["attention_mask"] = mask
        if self._keep_one:
            kwargs["logits_to_keep"] = 1
        # model.eval() walks every module (thousands with adapters): only when the model is in training mode.
        with _eval_mode(model) if model.training else contextlib.nullcontext():
            return model(**kwargs).logits[:, -1].float()

    def _pick(self, rows: list[Row], scores: Any) -> Any:
        """Each row's next token (its logit bias and sampler applied, else argmax), handed to the row."""
        tokens = _sample_rows(rows, scores).argmax(-1)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.step(token)
        return tokens

    def _merge(self, rows: list[Row], cache: Any, mask: Any, positions: Any, tokens: Any) -> None:
        """Append prefilled ``rows`` to the batch: both caches left-padded to one width, then stacked."""
        import torch

        if not self.rows:
            self.rows, self._cache, self._mask = rows, cache, mask
            self._positions, self._tokens = positions, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        self._positions = torch.cat([self._positions, positions])
        self._tokens = torch.cat([self._tokens, tokens])
        self.rows = self.rows + rows

    def _retire(self) -> list[Row]:
        """Drop the done rows from the batch (and the cache columns only padding uses); returns them."""
        import torch

        done = [row for row in self.rows if row.done]
        if not done:
            return []
        keep = [index for index, row in enumerate(self.rows) if not row.done]
        if not keep:
            self.drop()
            return done
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # the first column a remaining row uses
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._positions = self._positions.index_select(0, index)
        self._tokens = self._tokens.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        return done

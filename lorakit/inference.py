"""Serve a trained run: base + adapter, prompts rendered with the run's own template.

model = lk.InferenceModel.load("runs/support-bot")
model.generate("Summarize: ...")                      # -> the response text only
model.generate(["first prompt", "second prompt"])     # -> a list, generated as one left-padded batch
model.merge().save("runs/support-bot-merged")         # plain transformers can load this

for chunk in model.stream("Summarize: ..."):           # text chunks as they are generated
    print(chunk, end="", flush=True)
model.chat([{"role": "user", "content": "Hi"}])       # -> the assistant's reply
model.load_adapter("runs/other-task", name="other")   # several adapters on one base
model.generate("...", adapter="other")                # thread-safe: calls are serialised by a lock
merged = model.merge(verify=True)                      # merged.merge_report: max logit diff, perplexity change
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.config import ModelSpec, QuantSpec
from lorakit.data import detect_format, encode_prompt, to_messages
from lorakit.errors import ConfigError, DataError
from lorakit.export import export_gguf
from lorakit.generation import (
    ContinuousBatch,
    Decoding,
    Row,
    Sampling,
    Session,
    generate_rows,
    generate_texts,
    run_generate,
    stop_token_ids,
    stream_text,
)
from lorakit.merging import MergeReport, compare, reference_outputs, verification_sequences
from lorakit.modelcard import push_folder, write_model_card
from lorakit.models import (
    current_device,
    inference_placement,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from lorakit.progress import progress_enabled
from lorakit.rundir import TEMPLATE_FILE as TEMPLATE_FILE  # the public name, kept
from lorakit.rundir import RunDir, check_artifacts, check_base, check_safe_weights, read_json, read_run
from lorakit.runlock import readable_run
from lorakit.templates import get_template, template_from_dict
from lorakit.templates.base import check_messages
from lorakit.templates.jinja import to_chat_template
from lorakit.tracking.html import write_report_html

__all__ = ["AdapterInfo", "InferenceModel", "MergeReport"]

DEFAULT_ADAPTER = "default"
"""The name of the adapter :meth:`InferenceModel.load` puts on the base (PEFT's own default name)."""


@attrs.frozen
class AdapterInfo:
    """An adapter loaded on the base: where it came from and the template its prompts are rendered with."""

    name: str
    path: Path
    template: Any


class _Conversation(list):
    """A list of messages given to :meth:`InferenceModel.chat` (a plain list would be a batch of prompts)."""


class InferenceModel:
    """A causal LM (with or without a LoRA adapter), its tokenizer and the prompt template it was trained with.

    Build it with :meth:`load`; :meth:`merge` returns a new, adapter-free instance and leaves this one as it is.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any,
        *,
        base_spec: ModelSpec | None = None,
        base_path: str | None = None,
        quant: QuantSpec | None = None,
        adapter_dir: Path | None = None,
        dtype: str = "fp32",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.base_spec = base_spec
        self.base_path = base_path
        self.quant = quant
        self.adapter_dir = adapter_dir
        self.dtype = dtype
        self.merge_report: MergeReport | None = None
        """Set on the model :meth:`merge` returns when called with ``verify=True``."""
        self._lock = threading.RLock()
        self._adapters: dict[str, AdapterInfo] = {}
        if adapter_dir is not None:
            self._adapters[DEFAULT_ADAPTER] = AdapterInfo(DEFAULT_ADAPTER, Path(adapter_dir), template)

    def report(self, *, open_browser: bool = False) -> Path:
        """Rebuild the run's ``report.html`` (plan, curves, examples, samples, metrics) and return its path;
        ``open_browser=True`` also opens it. Raises ConfigError when the model was not loaded from a run."""
        run = RunDir(Path(self.adapter_dir)) if self.adapter_dir is not None else None
        if run is None or not run.is_run():
            raise ConfigError(
                "report(): this model was not loaded from a lorakit run directory "
                "(InferenceModel.load(run_dir)), so there is no run to report on."
            )
        path = write_report_html(run.path)
        if open_browser:
            import webbrowser

            webbrowser.open(path.resolve().as_uri())
        return path

    # --- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        base: str | None = None,
        template: Any = None,
        allow_base_mismatch: bool = False,
        trust_remote_code: bool = False,
        trust_template_classes: bool = False,
        allow_pickle: bool = False,
        device: str | None = None,
        dtype: str | None = None,
    ) -> InferenceModel:
        """Load a lorakit run directory, a PEFT adapter directory, or a model saved by :meth:`save`.

        The run directory of a full fine-tuning (``full_finetune()`` / ``freeze()``) holds the whole model: it
        loads as a plain model with the run's template, and :meth:`merge` returns it unchanged.

        Loading runs no code from the directory unless asked to: a run recorded with
        ``trust_remote_code: true``, a template naming an unregistered class, or pickled weights
        (``adapter_model.bin`` / ``pytorch_model.bin`` without safetensors) raise ConfigError before anything
        is loaded, unless the matching opt-in below is given.

        Args:
            path: the directory.
            base: the base model (path, Hub id or alias) to put the adapter on; by default the run's own base
                (or ``base_model_name_or_path`` of a plain PEFT adapter).
            template: override the prompt template; by default the one saved with the run.
            allow_base_mismatch: load the adapter even if ``base`` is not the model it was trained on (see
                :mod:`lorakit.rundir`); by default that is a ConfigError.
            trust_remote_code: run the Python code shipped with the base model (transformers'
                ``trust_remote_code``). A run's record asking for it is refused without this; the record's
                value is never used by itself.
            trust_template_classes: build a saved template whose class is not registered (imports it).
            allow_pickle: load weights saved as pickle (``*.bin``) when the directory has no safetensors.
            device: ``"cuda"`` or ``"cpu"``; None = the GPU when there is one (``device_map="auto"``).
            dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; None = the GPU's 16-bit type (bf16 where it is native,
                else fp16) on a GPU, fp32 on the CPU (:func:`lorakit.models.inference_placement`).
        """
        path = readable_run(Path(path).expanduser())  # a run still training: its last complete checkpoint
        run_dir = RunDir(path)
        if path.is_dir() and run_dir.is_full_model():
            return cls._load_plain(
                path,
                template,
                trust_remote_code=trust_remote_code,
                trust_template_classes=trust_template_classes,
                allow_pickle=allow_pickle,
                device=device,
                dtype=dtype,
            )
        run = read_run(path)
        check_artifacts(run_dir, run)  # damaged or missing files: a CorruptArtifactError naming them
        spec, quant, saved_template = _from_record(
            run_dir, run, template, trust_remote_code, trust_template_classes
        )
        kind, precision = inference_placement(device, dtype, current_device())
        if base is not None:
            spec = ModelSpec(base, trust_remote_code=trust_remote_code)
        check_safe_weights(run_dir, allow_pickle=allow_pickle)
        base_path = resolve_model_path(spec)
        check_base(path, spec.name_or_path, base_path, spec, allow_base_mismatch=allow_base_mismatch)
        tokenizer = load_tokenizer(str(path) if run_dir.tokenizer_config.is_file() else base_path, spec)
        chosen = _chosen_template(path, template if template is not None else saved_template, tokenizer)
        model = _attach_adapter(
            load_base_model(base_path, spec, dtype=torch_dtype(precision), quant=quant, device=kind), path
        )
        return cls(
            model,
            tokenizer,
            get_template(chosen, trust_template_classes=trust_template_classes),
            base_spec=spec,
            base_path=base_path,
            quant=quant,
            adapter_dir=path,
            dtype=precision,
        )

    @classmethod
    def from_model(
        cls,
        name_or_path: str,
        *,
        template: Any = "model",
        trust_remote_code: bool = False,
        trust_template_classes: bool = False,
        allow_pickle: bool = False,
        device: str | None = None,
        dtype: str | None = None,
    ) -> InferenceModel:
        """A base model without adapter (e.g. to measure it before fine-tuning) with the given template.

        ``trust_remote_code`` runs the Python code shipped with the model; ``trust_template_classes`` builds
        a template dict (given or saved next to the model) naming an unregistered class; ``allow_pickle``
        loads ``pytorch_model.bin`` weights of a local directory without safetensors. ``device`` / ``dtype``
        as in :meth:`load` (the GPU in its 16-bit type when there is one).
        """
        spec = ModelSpec(name_or_path, trust_remote_code=trust_remote_code)
        return cls._load_plain(
            Path(resolve_model_path(spec)),
            template,
            spec=spec,
            trust_template_classes=trust_template_classes,
            allow_pickle=allow_pickle,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def _load_plain(
        cls,
        path: Path,
        template: Any,
        *,
        spec: ModelSpec | None = None,
        trust_remote_code: bool = False,
        trust_template_classes: bool = False,
        allow_pickle: bool = False,
        device: str | None = None,
        dtype: str | None = None,
    ) -> InferenceModel:
        """A whole model directory: a merged export, a full fine-tuning run, or a base model."""
        run_dir = RunDir(path)
        spec = spec or ModelSpec(str(path), trust_remote_code=trust_remote_code)
        if template is None:
            template = run_dir.read_template()
        # A full fine-tuning run directory: the template it trained with (and the base's remote-code flag).
        run = run_dir.read_run() if run_dir.is_run() else None
        if path.is_dir():
            check_artifacts(run_dir, run)
        if run is not None:
            _check_remote_code(run_dir, run, spec.trust_remote_code)
            if template is None:
                template = run["template"]
        template = get_template(
            template if template is not None else "model", trust_template_classes=trust_template_classes
        )
        if path.is_dir():
            check_safe_weights(run_dir, allow_pickle=allow_pickle)
        tokenizer = load_tokenizer(str(path), spec)
        kind, precision = inference_placement(device, dtype, current_device())
        model = load_base_model(str(path), spec, dtype=torch_dtype(precision), device=kind).eval()
        return cls(model, tokenizer, template, base_spec=spec, base_path=str(path), dtype=precision)

    # --- generation ---------------------------------------------------------------------------------------

    def _messages(self, prompt: str | Mapping[str, Any] | _Conversation) -> list[dict[str, Any]]:
        """A prompt string or a data row (alpaca / prompt / messages form) -> messages ending with a user turn."""
        if isinstance(prompt, _Conversation):
            return list(prompt)
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, Mapping):
            row = dict(prompt)
            fmt = detect_format(list(row))
            for field in ("output", "completion"):
                row.setdefault(field, "-")  # the reply is not needed to render the prompt
            messages = to_messages(row, fmt, row_index=0, source_name="generate()")
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            return messages
        raise ConfigError(
            f"generate() takes a prompt string, a row dict, or a list of them; got {type(prompt).__name__}."
        )

    def encode(
        self, prompt: str | Mapping[str, Any] | Sequence[Any], *, adapter: str | None = None
    ) -> list[int]:
        """Token ids of a prompt exactly as training rendered it, ending with the assistant header.

        ``prompt`` is a string, a data row, or a conversation (a list of messages ending with a user turn).
        ``adapter`` picks the template of that adapter (each adapter keeps the template it was trained with).
        """
        if isinstance(prompt, Sequence) and not isinstance(prompt, (str, _Conversation)):
            prompt = _Conversation(prompt)

        return encode_prompt(self._messages(prompt), self.template_for(adapter), self.tokenizer)

    def template_for(self, adapter: str | None = None) -> Any:
        """The prompt template of an adapter (``None``: the adapter :meth:`load` put on, or the base's)."""
        name = self._resolve_adapter(adapter)
        return self._adapters[name].template if name is not None else self.template

    def generate(
        self,
        prompt: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        adapter: str | None = None,
        **gen_kwargs: Any,
    ) -> str | list[str]:
        """Generate the response to one prompt (a string) or a batch (a list of strings -> a list).

        The batch is left-padded and generated at once; with greedy decoding each answer equals the one
        generated alone. ``temperature=0`` is greedy decoding; ``top_p``, ``top_k``, ``repetition_penalty``
        and ``seed`` shape sampling (see :class:`lorakit.generation.Sampling`); ``stop`` adds stop strings to
        the template's end-of-turn markers; ``adapter`` picks an adapter loaded with :meth:`load_adapter`.
        Other keyword arguments go to ``model.generate``. Only the response text is returned, cut at the
        first stop string.

        Sampling never touches the global RNG: the same ``seed`` gives the same text, no ``seed`` a fresh
        random one, and ``torch.get_rng_state()`` is the same before and after the call.
        """
        sampling = Sampling(
            max_new_tokens,
            temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        single = isinstance(prompt, (str, Mapping, _Conversation))
        prompts = [prompt] if single else list(prompt)  # type: ignore[list-item]
        if not prompts:
            return []
        name = self._resolve_adapter(adapter)
        encoded = [self.encode(p, adapter=name) for p in prompts]
        decoding = self._decoding(sampling, name, gen_kwargs)
        texts = generate_texts(self._session(name), self.tokenizer, encoded, decoding)
        return texts[0] if single else texts

    def stream(
        self,
        prompt: str | Mapping[str, Any],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        adapter: str | None = None,
        **gen_kwargs: Any,
    ) -> Iterator[str]:
        """Generate the response to one prompt as an iterator of text chunks, as they are produced.

        The chunks join to what :meth:`generate` returns for the same arguments. Generation runs in a
        background thread (transformers' ``TextIteratorStreamer``); leaving the loop early stops it.

        Example:
            >>> for chunk in model.stream("Write a haiku about tokens."):
            ...     print(chunk, end="", flush=True)
        """
        sampling = Sampling(
            max_new_tokens,
            temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        if not isinstance(prompt, (str, Mapping, _Conversation)):
            raise ConfigError(
                f"stream() takes one prompt (a string or a row dict), got {type(prompt).__name__}; "
                "use generate() for a batch."
            )
        name = self._resolve_adapter(adapter)
        encoded = self.encode(prompt, adapter=name)
        decoding = self._decoding(sampling, name, gen_kwargs)
        return stream_text(self._session(name), self.tokenizer, encoded, decoding)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        *,
        stream: bool = False,
        **options: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to a conversation (OpenAI-style messages ending with a user turn).

        The conversation is rendered with the run's template exactly as training rendered it. With
        ``stream=True`` the reply comes as an iterator of chunks (see :meth:`stream`). Options are those of
        :meth:`generate` (``top_p``, ``seed``, ``stop``, ``adapter``, ...).

        Example:
            >>> history = [{"role": "user", "content": "Hi"}]
            >>> reply = model.chat(history)
            >>> history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise ConfigError(
                "chat() takes a list of messages like [{'role': 'user', 'content': 'Hi'}], got "
                f"{type(messages).__name__}; use generate() for a single prompt string."
            )
        try:
            check_messages(messages, add_generation_prompt=True)
        except DataError as error:
            raise ConfigError(f"chat(): {error}") from error
        conversation = _Conversation(dict(m) for m in messages)
        if stream:
            return self.stream(conversation, max_new_tokens, temperature, **options)  # type: ignore[arg-type]
        return self.generate(conversation, max_new_tokens, temperature, **options)  # type: ignore[arg-type, return-value]

    def _decoding(self, sampling: Sampling, adapter: str | None, gen_kwargs: dict[str, Any]) -> Decoding:
        """The decoding of one call: the adapter's template supplies the end-of-turn stop strings."""
        stops = self.template_for(adapter).stop_strings(self.tokenizer)
        return Decoding.build(self.tokenizer, stops, sampling, gen_kwargs)

    def _session(self, adapter: str | None) -> Session:
        """The generation session of ``adapter``: the lock held and the adapter active around each call."""

        @contextlib.contextmanager
        def session() -> Iterator[Any]:
            with self._lock, self._active(adapter):
                yield self.model

        return session

    def generate_rows(self, rows: Sequence[Row]) -> None:
        """Generate several requests as one batch, each with its own adapter (``Row.adapter``), decoding and
        text callback (see :func:`lorakit.generation.generate_rows`); the server batches through here.

        Rows for one adapter run with that adapter active, exactly as :meth:`generate` does. Rows for several
        LoRA adapters run as one mixed batch (PEFT's ``adapter_names``; ``None`` rows use the bare base);
        adapters that cannot share a batch (prompt-based ones) run one group after the other.
        """
        names = [self._resolve_adapter(row.adapter) for row in rows]
        groups = dict.fromkeys(names)
        if len(groups) == 1:
            generate_rows(self._session(names[0]), self.tokenizer, rows)
            return
        if all(self._mixable(name) for name in groups):
            adapter_names = [name if name is not None else "__base__" for name in names]
            session = self._session(next(n for n in names if n is not None))
            generate_rows(session, self.tokenizer, rows, adapter_names=adapter_names)
            return
        for group in groups:
            generate_rows(
                self._session(group),
                self.tokenizer,
                [r for r, n in zip(rows, names, strict=True) if n == group],
            )

    def continuous_batch(self) -> ContinuousBatch:
        """A :class:`lorakit.generation.ContinuousBatch` over this model: rows of any of its LoRA adapters (or
        of the bare base: ``Row.adapter`` as in :meth:`generate_rows`) join and leave between decode steps.

        A forward over rows of several adapters passes PEFT's ``adapter_names``: one batch mixes them. Raises ``ConfigError``
        when an adapter cannot share a batch (prompt-based ones): use :meth:`generate_rows` for those.
        """
        names = list(self._adapters)
        unmixable = [name for name in names if not self._mixable(name)]
        if unmixable:
            raise ConfigError(
                f"Continuous batching mixes LoRA adapters only; {unmixable} are prompt-based. "
                "Generate their rows with generate_rows() (lorakit serve --scheduler static)."
            )
        if not names:
            return ContinuousBatch(self._session(None), self.tokenizer)
        return ContinuousBatch(
            self._session(names[0]),
            self.tokenizer,
            adapter_name=lambda row: self._resolve_adapter(row.adapter) or "__base__",
            adapter_session=lambda name: self._session(None if name == "__base__" else name),
        )

    def _mixable(self, adapter: str | None) -> bool:
        """Whether ``adapter`` can share a batch with other adapters (PEFT mixes LoRA adapters only)."""
        if adapter is None:
            return True
        config = getattr(self.model, "peft_config", {}).get(adapter)
        return str(getattr(getattr(config, "peft_type", None), "value", "")) == "LORA"

    def _run_generate(
        self, encoded: list[list[int]], kwargs: dict[str, Any], adapter: str | None, seed: int | None
    ) -> Any:
        """``model.generate`` on left-padded ``encoded`` with ``adapter`` active and exactly ``kwargs``: the
        output ids, prompt columns included (for tests that compare with hand-rolled greedy decoding)."""
        pad = self.tokenizer.pad_token_id
        decoding = Decoding(kwargs, (), (), pad if pad is not None else self.tokenizer.eos_token_id, seed)
        with self._session(adapter)() as model:
            return run_generate(model, encoded, decoding)

    # --- several adapters on one base ---------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters on the base, in loading order (``"default"`` is the one :meth:`load` put on)."""
        return list(self._adapters)

    def _resolve_adapter(self, adapter: str | None) -> str | None:
        """The adapter a call uses: the named one, else ``"default"`` if loaded, else None (the bare base)."""
        if adapter is None:
            return DEFAULT_ADAPTER if DEFAULT_ADAPTER in self._adapters else None
        if adapter not in self._adapters:
            known = ", ".join(repr(a) for a in self._adapters) or "none"
            raise ConfigError(
                f"adapter={adapter!r} is not loaded (loaded adapters: {known}). Load it first with "
                f"model.load_adapter(path, name={adapter!r})."
            )
        return adapter

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        """Make ``adapter`` the active one (None: every adapter off) for the duration; call with the lock held."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield
            return
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        if self.model.active_adapter != adapter:
            self.model.set_adapter(adapter)
        yield

    def load_adapter(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        allow_base_mismatch: bool = False,
        trust_remote_code: bool = False,
        trust_template_classes: bool = False,
        allow_pickle: bool = False,
    ) -> str:
        """Put another adapter (a run directory or a PEFT adapter directory) on the same base weights.

        The adapter keeps its own prompt template (from its run directory; this model's template for a plain
        PEFT adapter). Select it per call with ``generate(..., adapter=name)``; calls from several threads
        are serialised by a lock, so each gets its own adapter's output. Returns the name.

        ``trust_remote_code``, ``trust_template_classes`` and ``allow_pickle`` are the opt-ins of
        :meth:`load`, checked against this adapter's own run record and files.

        Raises:
            ConfigError: the name is taken, the directory is not an adapter, the adapter was trained on
                another base (unless ``allow_base_mismatch=True``), or loading it would run code the caller
                did not opt into.
        """
        from peft import PeftModel

        path = readable_run(Path(path).expanduser())
        run = read_run(path)
        check_artifacts(RunDir(path), run)
        if run is not None:
            _check_remote_code(RunDir(path), run, trust_remote_code)
        if run is not None and ((run["pipeline"].get("method") or {}).get("name")) == "full":
            raise ConfigError(
                f"{path} is a full fine-tuning run: it holds a whole model, not an adapter to put on this base. "
                "Load it on its own with InferenceModel.load(path)."
            )
        name = name or path.name
        if not isinstance(name, str) or not name or name in self._adapters:
            raise ConfigError(
                f"load_adapter(name={name!r}): the name is empty or taken (loaded: {', '.join(self._adapters)}). "
                "Pass another name=."
            )
        if self.base_spec is not None and self.base_path is not None:
            check_base(
                path,
                self.base_spec.name_or_path,
                self.base_path,
                self.base_spec,
                allow_base_mismatch=allow_base_mismatch,
            )
        template = (
            get_template(run["template"], trust_template_classes=trust_template_classes)
            if run is not None
            else self.template
        )
        check_safe_weights(RunDir(path), allow_pickle=allow_pickle)
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
            self._adapters[name] = AdapterInfo(name, path, template)
        return name

    def unload(self, name: str | None = None) -> None:
        """Remove one adapter (or, with no name, every adapter) from the base and free its weights.

        After the last adapter is gone the model is the plain base again.
        """
        from peft import PeftModel

        with self._lock:
            names = list(self._adapters) if name is None else [name]
            for adapter in names:
                self._resolve_adapter(adapter)  # unknown names raise, listing the loaded ones
                if len(self._adapters) == 1:
                    assert isinstance(self.model, PeftModel)
                    self.model = self.model.unload()  # the base without adapter layers
                else:
                    if self.model.active_adapter == adapter:  # switch first, so PEFT does not warn
                        self.model.set_adapter(next(a for a in self._adapters if a != adapter))
                    self.model.delete_adapter(adapter)
                del self._adapters[adapter]
                if adapter == DEFAULT_ADAPTER:
                    self.adapter_dir = None

    # --- merge and export ---------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: where the model's weights are."""
        if self.model is None:
            return "cpu"
        return next(self.model.parameters()).device.type

    @property
    def is_merged(self) -> bool:
        """True when the model carries no adapter (merged, or loaded from a plain model directory)."""
        return not self._adapters

    def merge(
        self,
        *,
        verify: bool = False,
        verify_prompts: Sequence[Any] | None = None,
        tolerance: float = 0.01,
        inplace: bool = False,
        adapter: str | None = None,
    ) -> InferenceModel:
        """Fold an adapter into the base weights and return an adapter-free InferenceModel.

        A model without adapter (already merged, a saved model, or a full fine-tuning run) has nothing to fold
        and is returned as it is.

        The base is reloaded un-quantized (fp32 on CPU, the run's 16-bit dtype on a GPU) when it was loaded
        in 4 or 8 bits: merging into quantized weights would round the update away.

        A LoftQ adapter (``with_lora(init='loftq')``) is different: its ``B @ A`` started as the fit of
        ``W - Q(W)``, so it belongs on the quantized weights ``Q(W)``. It is merged into the base loaded in
        4 bits exactly as trained and then dequantized; folded into ``W`` it would add the quantization error
        twice.

        Args:
            verify: compare the merged model with adapter-on-base on a few sequences (``verify_prompts``, else
                the run's first training rows, else generic prompts); the result is the returned model's
                ``merge_report`` (:class:`lorakit.merging.MergeReport`: max logit difference, perplexity
                before / after). A perplexity change above ``tolerance`` (relative) warns.
            inplace: merge into this model's own weights instead of a fresh copy of the base, so two full
                copies are never in memory at once; this model then *is* the merged model (and is returned).
                For a quantized base the quantized model is freed before the un-quantized reload.
            adapter: which loaded adapter to merge (default: the one :meth:`load` put on, or the only one).
        """
        if self.is_merged:
            return self
        info = self._adapters[self._merge_target(adapter)]
        check = self._merge_reference(info, verify_prompts) if verify else None
        with self._lock:
            merged = self._merged_weights(info, inplace=inplace)
            target = self._adopt(merged, info, inplace=inplace)
        if check is not None:
            sequences, reference, reference_name = check
            target.merge_report = compare(
                merged, sequences, reference, reference_name=reference_name, tolerance=tolerance
            )
        return target

    def _merge_target(self, adapter: str | None) -> str:
        """The adapter :meth:`merge` folds in; several adapters need a name, prompt-based ones cannot merge."""
        if adapter is None and DEFAULT_ADAPTER not in self._adapters and len(self._adapters) > 1:
            raise ConfigError(
                f"merge(): several adapters are loaded ({', '.join(self._adapters)}); pass adapter=<name>."
            )
        name = self._resolve_adapter(adapter) or next(iter(self._adapters))
        peft_config = getattr(self.model, "peft_config", {}).get(name)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ConfigError(
                f"The adapter in {self._adapters[name].path} is prompt-based (virtual tokens, not weight "
                "updates) and cannot be merged into the base weights. Serve it unmerged: "
                "InferenceModel.load(...).generate()."
            )
        return name

    def _merge_reference(
        self, info: AdapterInfo, verify_prompts: Sequence[Any] | None
    ) -> tuple[list[tuple[list[int], list[bool]]], list[Any], str]:
        """The verification sequences, the adapter model's logits on them and what they are called."""
        reference_name = "adapter on the base"
        if self.quant is not None:
            reference_name = f"adapter on the {self.quant.bits}-bit base"
        sequences = verification_sequences(self.tokenizer, info.template, verify_prompts, info.path)
        with self._lock, self._active(info.name):
            reference = reference_outputs(self.model, sequences)
        return sequences, reference, reference_name

    def _merged_weights(self, info: AdapterInfo, *, inplace: bool) -> Any:
        """The base with ``info``'s adapter folded in (call with the lock held)."""
        if inplace and self.quant is None:
            for other in [a for a in self._adapters if a != info.name]:
                self.model.delete_adapter(other)
            return self.model.merge_and_unload(progressbar=progress_enabled())
        if inplace:  # free the quantized model before loading the un-quantized base
            self.model = None
            gc.collect()
        assert self.base_spec is not None and self.base_path is not None
        base = _base_to_merge_into(
            self.base_path, self.base_spec, torch_dtype(self.dtype), info.path, device=self.device
        )
        return _attach_adapter(base, info.path).merge_and_unload(progressbar=progress_enabled())

    def _adopt(self, merged: Any, info: AdapterInfo, *, inplace: bool) -> InferenceModel:
        """The InferenceModel of the merged weights: this one (``inplace``) or a new one."""
        merged.eval()
        if not inplace:
            return InferenceModel(
                merged,
                self.tokenizer,
                info.template,
                base_spec=self.base_spec,
                base_path=self.base_path,
                dtype=self.dtype,
            )
        self.model, self.template, self.quant = merged, info.template, None
        self._adapters.clear()
        self.adapter_dir = None
        return self

    def save(
        self,
        path: str | Path,
        *,
        max_shard_size: int | str | None = None,
        chat_template: bool | str = True,
    ) -> Path:
        """Write a plain transformers model directory (safetensors, tokenizer, generation config).

        ``AutoModelForCausalLM.from_pretrained(path)`` loads it; ``InferenceModel.load(path)`` also restores
        the prompt template. Only an adapter-free model can be saved: call :meth:`merge` first.

        The saved ``generation_config.json`` is the model's generation config with ``eos_token_id`` set to
        the template's stop tokens (the tokenizer's EOS and every single-token end-of-turn marker: one id, or
        a list) and ``pad_token_id`` to the tokenizer's pad token, so plain ``model.generate`` stops where
        lorakit does. The model's own ``generation_config`` is left as it is.

        Args:
            path: the output directory.
            max_shard_size: split the weights into safetensors shards of at most this size (``"2GB"``,
                ``"500MB"`` or bytes); transformers' default (50GB) when None.
            chat_template: ``True`` writes the run's template as the tokenizer's Jinja chat template, so
                ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` renders exactly the
                prompt lorakit trained on; a string sets that Jinja template; ``False`` keeps the tokenizer's.
        """
        if not self.is_merged:
            raise ConfigError(
                "save() writes a plain transformers model, but this model still carries an adapter. "
                "Call .merge() first (model.merge().save(path)); the adapter itself is already in the run directory."
            )
        jinja = self._export_chat_template(chat_template)
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        shard = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        with self._lock:
            self.model.save_pretrained(str(path), **shard)
            self._export_generation_config().save_pretrained(str(path))
        previous = self.tokenizer.chat_template
        try:
            if jinja is not None:
                self.tokenizer.chat_template = jinja
            self.tokenizer.save_pretrained(str(path))
        finally:
            self.tokenizer.chat_template = previous
        RunDir(path).write_template(self.template)
        write_model_card(
            path,
            base_model=self.base_spec.name_or_path if self.base_spec is not None else None,
            template=self.template,
            adapter=False,
            tokenizer=self.tokenizer,
        )
        return path

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = True,
        token: str | None = None,
        adapter: str | None = None,
        endpoint: str | None = None,
        commit_message: str = "Upload with lorakit",
    ) -> str:
        """Upload to the Hugging Face Hub as ``repo_id`` (a private repo unless ``private=False``); the commit URL.

        With an adapter: its directory (weights, tokenizer, run record, template and model card; never the
        checkpoints, the copy of the training data or the logs), so ``InferenceModel.load(repo_id)`` and PEFT
        load it. Without (merged / full model): :meth:`save` into a temporary directory, then that. ``token``
        and ``endpoint`` (default ``$HF_ENDPOINT``) go to ``huggingface_hub.HfApi``.
        """
        import tempfile

        name = None if self.is_merged else (self._resolve_adapter(adapter) or next(iter(self._adapters)))
        options = {"private": private, "token": token, "endpoint": endpoint, "commit_message": commit_message}
        if name is not None:
            return push_folder(self._adapters[name].path, repo_id, **options)
        with tempfile.TemporaryDirectory(prefix="lorakit-push-") as folder:
            return push_folder(self.save(folder), repo_id, **options)

    def export_gguf(self, path: str | Path, dtype: str = "f16", *, adapter: str | None = None) -> Path:
        """Write the merged model as a GGUF file (``f32``, ``f16`` or ``q8_0`` weights) with the tokenizer and
        this run's template as its chat template, and an Ollama ``Modelfile`` beside it; see
        :mod:`lorakit.export`. An adapter is merged first (this model is left as it is); ``adapter`` picks one
        when several are loaded. Returns the GGUF path.
        """
        merged = self.merge(adapter=adapter)
        return export_gguf(merged.model, merged.tokenizer, merged.template, path, dtype)

    def _export_chat_template(self, chat_template: bool | str) -> str | None:
        """The Jinja chat template :meth:`save` writes (None: keep the tokenizer's)."""
        if chat_template is True:
            return to_chat_template(self.template, self.tokenizer)
        if isinstance(chat_template, str):
            return chat_template
        if chat_template is not False:
            raise ConfigError(
                f"save(chat_template=...) takes True, False or a Jinja string, got {chat_template!r}."
            )
        return None

    def _export_generation_config(self) -> Any:
        """A copy of the model's generation config that stops at the template's end of turn."""
        config = copy.deepcopy(self.model.generation_config)
        stops = stop_token_ids(self.tokenizer, self.template.stop_strings(self.tokenizer))
        config.eos_token_id = stops if len(stops) > 1 else stops[0]
        config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def __repr__(self) -> str:
        where = "merged" if self.is_merged else f"adapters={self.adapters}"
        return f"InferenceModel(base={self.base_path!r}, {where}, template={self.template.name!r})"


def _loftq_quant(adapter_dir: Path) -> QuantSpec | None:
    """The 4-bit quantization a LoftQ adapter was trained on (from its run file); None for other adapters."""
    run = read_run(adapter_dir)
    if run is None:
        return None
    config = run["pipeline"]
    method = config.get("method") or {}
    if method.get("name") != "lora" or method.get("init") != "loftq" or not config.get("quant"):
        return None
    return QuantSpec(**config["quant"])


def _base_to_merge_into(
    base_path: str, spec: ModelSpec, dtype: Any, adapter_dir: Path, *, device: str = "cpu"
) -> Any:
    """The un-quantized base an adapter is merged into (on ``device``); for LoftQ the dequantized 4-bit base
    it fits."""
    loftq_quant = _loftq_quant(adapter_dir)
    if loftq_quant is None:
        return load_base_model(base_path, spec, dtype=dtype, device=device)
    base = load_base_model(base_path, spec, dtype=dtype, quant=loftq_quant)
    return base.dequantize(dtype=dtype)


def _attach_adapter(base: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _chosen_template(path: Path, template: Any, tokenizer: Any) -> Any:
    """The template to load with: the given / saved one, else the tokenizer's chat template."""
    if template is not None:
        return template
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{path} is a plain PEFT adapter without a lorakit run file, and its tokenizer has no chat "
            "template: pass template='alpaca' (or the template it was trained with)."
        )
    return "model"


# --- what a run directory may make us run ---------------------------------------------------------------


def _check_remote_code(run_dir: RunDir, run: Mapping[str, Any], trusted: bool) -> None:
    """Refuse a run whose record asks for ``trust_remote_code`` unless the caller opted in: the record alone
    must never make lorakit run the Python code shipped with a model."""
    model = run.get("pipeline", {}).get("model") or {}
    if not model.get("trust_remote_code") or trusted:
        return
    raise ConfigError(
        f"{run_dir.run_file} records trust_remote_code: true for the base model "
        f"{model.get('name_or_path')!r}: loading it would run Python code shipped with that model. lorakit "
        "does not do that because a run directory says so. If you trust the run and the model, pass "
        "InferenceModel.load(..., trust_remote_code=True) (CLI: --trust-remote-code)."
    )


def _from_record(
    run_dir: RunDir,
    run: Mapping[str, Any] | None,
    template: Any,
    trust_remote_code: bool,
    trust_template_classes: bool,
) -> tuple[ModelSpec, QuantSpec | None, Any]:
    """The base spec, quantization and saved template of a run record (or of a plain PEFT adapter's config),
    checked before anything is loaded. The spec carries the caller's ``trust_remote_code``, never the
    record's."""
    if run is None:
        adapter_config = read_json(run_dir.adapter_config) or {}
        spec = ModelSpec(
            adapter_config.get("base_model_name_or_path") or "", trust_remote_code=trust_remote_code
        )
        return spec, None, None
    _check_remote_code(run_dir, run, trust_remote_code)
    config = run["pipeline"]
    spec = ModelSpec(**{**config["model"], "trust_remote_code": trust_remote_code})
    quant = QuantSpec(**config["quant"]) if config.get("quant") else None
    saved_template = None
    if template is None:
        saved_template = template_from_dict(run["template"], trust_template_classes=trust_template_classes)
    return spec, quant, saved_template

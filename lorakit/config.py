"""Frozen specs: what a run is made of, validated when built, free of loaded objects.

Each spec is an attrs frozen class; a bad value raises :class:`~lorakit.errors.ConfigError` naming the field,
the value and the fix. Specs hold ids, paths and numbers only, never a loaded model, so a
:class:`~lorakit.Pipeline` is cheap to build, compare and serialise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError

__all__ = [
    "HubDataset",
    "DataSpec",
    "ModelSpec",
    "QuantSpec",
    "TrackSpec",
    "TrainSpec",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = (
    "auto",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
TRACKERS = ("none", "wandb", "tensorboard", "mlflow")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
SECRET_OPTION_WORDS = ("key", "token", "secret", "password")


# --- validators -------------------------------------------------------------------------------------------
# Each returns an attrs validator that raises ConfigError with the field name, the value and a hint.


def _fail(attribute: attrs.Attribute, value: Any, must: str, fix: str) -> None:
    raise ConfigError(f"`{attribute.name}` must be {must}, got {value!r}. {fix}".strip())


def positive_int(fix: str = "") -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            _fail(attribute, value, "a positive integer", fix)

    return check


def optional_positive_int(fix: str = "") -> Callable[[Any, attrs.Attribute, Any], None]:
    inner = positive_int(fix)

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            inner(inst, attribute, value)

    return check


def number_in(low: float, high: float, *, high_open: bool = False, low_open: bool = False, fix: str = ""):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (
                value < high if high_open else value <= high
            )
        if not ok:
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            _fail(attribute, value, f"a number in {lo}{low}, {high}{hi}", fix)

    return check


def one_of(choices: tuple[str, ...], fix: str = "") -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            _fail(attribute, value, "one of " + ", ".join(repr(c) for c in choices), fix)

    return check


def to_names(value: Any) -> Any:
    """Converter for module-name options: a single name or a list becomes a tuple; other values pass through
    to the validator."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _to_float(value: Any) -> Any:
    """Accept "2e-4" from YAML/CLI; leave anything else for the validator to reject."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _option_pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    """Converter for pass-through options: a dict becomes sorted ``(key, value)`` pairs (hashable, frozen)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        value = value.items()
    try:
        pairs = tuple(sorted((key, item) for key, item in value))
    except (TypeError, ValueError):
        raise ConfigError(f"options must be a dict of keyword arguments, got {value!r}.") from None
    for key, _ in pairs:
        if not isinstance(key, str):
            raise ConfigError(f"option names must be strings, got {key!r}.")
    return pairs


# --- specs ------------------------------------------------------------------------------------------------


@attrs.frozen
class ModelSpec:
    """The base model: where it comes from and how it is loaded."""

    name_or_path: str = attrs.field()
    """A local directory, a Hugging Face model id, or an embedded alias such as ``"smollm2-135m"``."""
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES, "Use 'auto' unless you need a dtype."))
    """Weight dtype when not quantized; ``"auto"`` follows the training precision."""
    trust_remote_code: bool = attrs.field(default=False, converter=bool)
    """Run modelling code shipped with the checkpoint (only for repositories you trust)."""
    revision: str | None = attrs.field(default=None)
    """A branch, tag or commit of a Hub repository."""
    attention: str = attrs.field(default="auto", validator=one_of(ATTENTIONS))
    """Attention kernel: ``"auto"`` = flash-attention 2 when installed on a GPU that runs it, else SDPA."""
    options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_option_pairs)
    """Extra ``from_pretrained`` keyword arguments (``from_model(model_options={...})``), checked by the builder."""

    @property
    def option_dict(self) -> dict[str, Any]:
        """``options`` as a dict."""
        return dict(self.options)

    @name_or_path.validator
    def _check_name(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            _fail(attribute, value, "a non-empty string", "Pass a local path, a Hub id or 'smollm2-135m'.")


@attrs.frozen
class QuantSpec:
    """Load the base weights quantized by bitsandbytes (QLoRA with 4 bits)."""

    bits: int = attrs.field(validator=one_of((4, 8), "Use quantize_4bit() or quantize_8bit()."))  # type: ignore[arg-type]
    """4 or 8."""
    quant_type: str = attrs.field(
        default="nf4", validator=one_of(("nf4", "fp4"), "nf4 is the QLoRA default.")
    )
    """4-bit data type: ``"nf4"`` (normal float, the QLoRA paper's) or ``"fp4"``."""
    double_quant: bool = attrs.field(default=True, converter=bool)
    """Quantize the quantization constants too (saves ~0.4 bit per weight)."""
    compute_dtype: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(one_of(DTYPES[1:], "None follows the training precision.")),
    )
    """dtype of the matmuls on dequantized weights; ``None`` follows the training precision."""

    @property
    def method_name(self) -> str:
        """The builder call that made this spec, for messages."""
        return f"quantize_{self.bits}bit()"


DATA_FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "text")
OVERFLOW_POLICIES = ("truncate_prompt", "truncate", "drop", "error")


def _to_rows_or_path(value: Any) -> Any:
    """A Path becomes a str; a pandas DataFrame a list of row dicts; a DatasetDict its ``train`` split."""
    import sys
    from pathlib import Path

    if isinstance(value, Path):
        return str(value)
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, pandas.DataFrame):
        from lorakit.data.load import _frame_rows

        return _frame_rows(value)
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(value, datasets.DatasetDict):
        if "train" not in value:
            raise ConfigError(
                f"`source` is a DatasetDict without a 'train' split (splits: {list(value)}); pass one split."
            )
        return value["train"]
    return value


def _to_val(value: Any) -> Any:
    """Like the source, and a ``datasets.Dataset`` becomes its rows so the config stays serialisable."""
    value = _to_rows_or_path(value)
    if value is not None and not isinstance(value, (str, list)) and hasattr(value, "to_list"):
        return value.to_list()
    return value


def _to_columns(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        value = value.items()
    try:
        pairs = tuple((ours, theirs) for ours, theirs in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"`columns` must map lorakit field names to your column names, e.g. "
            f'{{"instruction": "question", "output": "answer"}}; got {value!r}.'
        ) from None
    for ours, theirs in pairs:
        if not isinstance(ours, str) or not isinstance(theirs, str):
            raise ConfigError(f"`columns` names must be strings, got {ours!r}: {theirs!r}.")
    return pairs


def _check_data_source(attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str | bytes) and not str(value).strip():
        _fail(attribute, value, "a path, a list of dicts or a datasets.Dataset", "")
    if isinstance(value, list) and not all(isinstance(r, Mapping) for r in value):
        raise ConfigError(
            f"`{attribute.name}` given as a list must be a list of dicts (one per row), "
            f"got an element of type {type(next(r for r in value if not isinstance(r, Mapping))).__name__}."
        )
    if isinstance(value, (int, float, bool)):
        _fail(attribute, value, "a path, a list of dicts or a datasets.Dataset", "")


@attrs.frozen
class DataSpec:
    """Where the training rows come from and how they become token ids and labels."""

    source: Any = attrs.field(converter=_to_rows_or_path)
    """A file or directory path, a Hub dataset id, a list of dicts, a DataFrame, or a ``datasets.Dataset``."""
    template: Any = attrs.field(default="alpaca")
    """A template name from ``lorakit.templates``, a Jinja chat template, or a template object."""
    val_split: float = attrs.field(
        default=0.1,
        converter=_to_float,
        validator=number_in(0.0, 1.0, high_open=True, fix="Use e.g. 0.1, or 0."),
    )
    """Fraction of rows held out for validation (0 for none); ignored when ``val`` is given."""
    max_length: int = attrs.field(default=1024, validator=positive_int("Use e.g. max_length=1024."))
    """Longest tokenized example; what happens to longer ones is ``on_overflow`` (counted in the report)."""
    seed: int = attrs.field(default=42)
    """Seed of the train/validation split."""
    train_on_inputs: bool = attrs.field(default=False, converter=bool)
    """Train on prompt tokens too; by default only response tokens (and their EOS) carry loss."""
    val: Any = attrs.field(default=None, converter=_to_val)
    """An explicit validation source (same kinds as ``source``), instead of ``val_split``."""
    format: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(one_of(DATA_FORMATS, "Or None to detect it from the columns.")),
    )
    """The row format; None detects it from the columns."""
    columns: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_to_columns)
    """``(lorakit field, your column)`` pairs; ``with_dataset(columns={...})`` takes a dict."""
    on_overflow: str = attrs.field(
        default="truncate_prompt",
        validator=one_of(OVERFLOW_POLICIES, "'truncate_prompt' keeps the response and cuts the prompt."),
    )
    """Examples over ``max_length``: cut the prompt from the left, cut the end, drop them, or raise."""
    on_bad_row: str = attrs.field(
        default="error", validator=one_of(("error", "skip"), "Use 'error' or 'skip'.")
    )
    """A malformed row raises DataError (``"error"``) or is skipped and counted (``"skip"``)."""
    dedup: bool = attrs.field(default=True, converter=bool)
    """Drop rows that exactly repeat an earlier row (counted)."""
    min_chars: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None for no filter.")
    )
    """Drop rows with fewer characters of text than this (counted)."""
    max_chars: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None for no filter.")
    )
    """Drop rows with more characters of text than this (counted)."""
    text_unit: str = attrs.field(default="line", validator=one_of(("line", "file"), "Use 'line' or 'file'."))
    """Plain-text files: one document per line or per file."""
    packing: bool = attrs.field(default=False, converter=bool)
    """Pack examples into ``max_length`` sequences, padding-free, without cross-example attention."""
    num_proc: int | None = attrs.field(default=None, validator=optional_positive_int("Or None for one."))
    """Processes for tokenization."""
    cache: bool = attrs.field(default=True, converter=bool)
    """Reuse tokenized data of an identical earlier run (``$LORAKIT_CACHE_DIR`` or the user cache)."""
    config: str | None = attrs.field(default=None)
    """Hub datasets: the configuration (subset) name passed to ``datasets.load_dataset``."""
    split: str | None = attrs.field(default=None)
    """Hub datasets: the split to train on (``"train"`` when None), e.g. ``"train[:10%]"``."""
    streaming: bool = attrs.field(default=False, converter=bool)
    """Hub datasets: stream rows instead of downloading the whole dataset; needs ``max_steps``."""

    def __attrs_post_init__(self) -> None:
        if self.config is not None or self.split is not None or self.streaming:
            if not isinstance(self.source, str) or Path(self.source).expanduser().exists():
                raise ConfigError(
                    f"with_dataset(config=/split=/streaming=) are for Hub dataset ids such as 'org/name'; "
                    f"the source {self.source if isinstance(self.source, str) else type(self.source).__name__!r} "
                    "is not one. Drop them, or pass the dataset id."
                )
            hub = HubDataset(
                str(self.source),
                config=self.config,
                split=self.split,
                streaming=self.streaming,
                max_rows=getattr(self.source, "max_rows", None),
            )
            object.__setattr__(self, "source", hub)

    @source.validator
    def _check_source(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            _fail(attribute, value, "a path, a list of dicts or a datasets.Dataset", "")
        _check_data_source(attribute, value)

    @val.validator
    def _check_val(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            _check_data_source(attribute, value)

    @max_length.validator
    def _check_max_length(self, attribute: attrs.Attribute, value: int) -> None:
        if value < 16:
            _fail(attribute, value, "at least 16", "Short limits cut every response; use e.g. 512 or 1024.")

    @property
    def column_map(self) -> dict[str, str]:
        """``columns`` as a dict."""
        return dict(self.columns)

    def prepare_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lorakit.data.prepare_data` (all but source, tokenizer, template)."""
        return {
            "val_split": self.val_split,
            "max_length": self.max_length,
            "seed": self.seed,
            "train_on_inputs": self.train_on_inputs,
            "val_source": self.val,
            "format": self.format,
            "columns": self.column_map or None,
            "on_overflow": self.on_overflow,
            "on_bad_row": self.on_bad_row,
            "dedup": self.dedup,
            "min_chars": self.min_chars,
            "max_chars": self.max_chars,
            "text_unit": self.text_unit,
            "packing": self.packing,
            "num_proc": self.num_proc,
            "cache": self.cache,
        }


class HubDataset(str):
    """A Hub dataset id (a ``str``) carrying ``load_dataset`` options: config, split, streaming, row limit."""

    config: str | None
    split: str | None
    streaming: bool
    max_rows: int | None

    def __new__(
        cls,
        dataset_id: str,
        *,
        config: str | None = None,
        split: str | None = None,
        streaming: bool = False,
        max_rows: int | None = None,
    ) -> HubDataset:
        hub = super().__new__(cls, dataset_id)
        hub.config, hub.split, hub.streaming, hub.max_rows = config, split, streaming, max_rows
        return hub

    def with_max_rows(self, max_rows: int | None) -> HubDataset:
        """The same dataset, reading at most ``max_rows`` rows (how many a streamed run consumes)."""
        return HubDataset(
            str(self), config=self.config, split=self.split, streaming=self.streaming, max_rows=max_rows
        )


@attrs.frozen
class TrainSpec:
    """Optimisation hyper-parameters; TRL's SFTTrainer runs the loop."""

    epochs: float = attrs.field(
        default=3, converter=_to_float, validator=number_in(0, 1e6, low_open=True, fix="Use e.g. epochs=3.")
    )
    """Passes over the training rows (ignored when ``max_steps`` is set)."""
    max_steps: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None to use epochs.")
    )
    """Stop after this many optimizer steps; overrides ``epochs``."""
    lr: float = attrs.field(
        default=2e-4,
        converter=_to_float,
        validator=number_in(0, 1.0, low_open=True, fix="LoRA typically uses 1e-4..5e-4."),
    )
    """Peak learning rate."""
    batch_size: int = attrs.field(default=4, validator=positive_int("Use e.g. batch_size=4."))
    """Examples per device per forward pass."""
    grad_accum: int = attrs.field(default=1, validator=positive_int("Use 1 for no accumulation."))
    """Forward passes accumulated per optimizer step (effective batch = batch_size * grad_accum * devices)."""
    scheduler: str = attrs.field(default="cosine", validator=one_of(SCHEDULERS))
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = attrs.field(
        default=0.03, converter=_to_float, validator=number_in(0.0, 1.0, high_open=True)
    )
    """Fraction of the steps spent warming the learning rate up from 0."""
    weight_decay: float = attrs.field(default=0.0, converter=_to_float, validator=number_in(0.0, 1.0))
    """AdamW weight decay."""
    grad_checkpointing: bool | None = attrs.field(default=None)
    """Recompute activations in the backward pass; ``None`` = on for GPU runs, off on CPU (where it costs ~30%)."""
    precision: str = attrs.field(default="auto", validator=one_of(PRECISIONS))
    """``"auto"`` = bf16 on GPUs with native bf16, fp16 on older GPUs; on CPU bf16 autocast where native, else fp32."""
    seed: int = attrs.field(default=42)
    """Seed of initialisation, dropout and data order."""
    logging_steps: int = attrs.field(default=10, validator=positive_int())
    """Log the training loss every N optimizer steps."""
    eval_steps: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None to evaluate per epoch.")
    )
    """Evaluate every N steps; ``None`` evaluates at the end of each epoch (when there is a validation split)."""
    save_steps: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None for no checkpoints.")
    )
    """Write a checkpoint every N steps; ``None`` saves only the final adapter."""
    optim: str = attrs.field(
        default="auto",
        validator=one_of(OPTIMIZERS, "adamw_8bit / paged_* use bitsandbytes; paged_* need a CUDA GPU."),
    )
    """The optimizer (a transformers ``optim`` name); ``paged_*`` page optimizer state to the CPU on a GPU. The
    default ``"auto"`` = ``paged_adamw_8bit`` for QLoRA on a GPU, else fused AdamW (one kernel over all adapter
    tensors, on CPU and CUDA: the updates of ``"adamw_torch"`` within 1e-8, its step 14x faster on SmolLM2's 420
    LoRA tensors, bench note); decided by :func:`lorakit.plan.decide_optimizer` when training starts. The
    recorded config keeps ``"auto"``; the run record's ``optimizer`` is what it became."""

    compile: bool | str = attrs.field(default=False)
    """``torch.compile`` the decoder layers (in place) before training: ``False`` (default, until the bench shows
    a win including the compile time, see ``docs/benchmarks.md``), ``True``, or ``"auto"`` (compile on a CUDA
    GPU, not on CPU)."""
    fused_loss: bool = attrs.field(default=True)
    """Compute the training loss with lorakit's fused linear cross-entropy (only loss positions reach the LM head,
    no full-vocabulary logits, see :mod:`lorakit.fused`) where it applies; ``False`` uses TRL's loss."""
    liger: bool | None = attrs.field(default=None)
    """Liger kernels (TRL's ``use_liger_kernel``); None = on for GPU runs when ``liger_kernel`` is installed."""
    options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_option_pairs)
    """Extra ``SFTConfig`` fields (``with_training(trainer_options={...})``), checked by the builder."""

    @property
    def option_dict(self) -> dict[str, Any]:
        """``options`` as a dict."""
        return dict(self.options)

    group_by_length: bool = attrs.field(default=True)
    """Batch examples of similar length together (seeded, random order of batches), so dynamic padding computes
    few pad tokens; ``False`` batches in random order. Ignored with ``packing=True`` (padding-free)."""
    padding_free: bool | str = attrs.field(default="auto")
    """Concatenate each batch into one row with per-example ``position_ids`` instead of padding it (no pad token
    computed, no cross-example attention): ``"auto"`` = on with flash-attention 2, off with SDPA / eager (then a
    block-diagonal mask over the whole batch costs more than padding); ``True`` forces it. See
    :func:`lorakit.plan.decide_padding_free`."""

    @padding_free.validator
    def _check_padding_free(self, attribute: attrs.Attribute, value: Any) -> None:
        if value != "auto" and not isinstance(value, bool):
            _fail(
                attribute,
                value,
                'True, False or "auto"',
                '"auto" concatenates batches where the attention kernel makes it pay (flash-attention 2).',
            )

    @liger.validator
    def _check_liger(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not isinstance(value, bool):
            _fail(
                attribute,
                value,
                "True, False or None",
                "None turns Liger kernels on when installed on a GPU.",
            )

    @group_by_length.validator
    def _check_grouping(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            _fail(attribute, value, "True or False", "")

    @compile.validator
    def _check_compile(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in (True, False, "auto") or not isinstance(value, (bool, str)):
            _fail(attribute, value, 'True, False or "auto"', "")

    @fused_loss.validator
    def _check_fused_loss(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            _fail(attribute, value, "True or False", "")

    @grad_checkpointing.validator
    def _check_gc(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not isinstance(value, bool):
            _fail(attribute, value, "True, False or None", "None picks per device.")


def _freeze_options(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), v) for k, v in value.items()))
    return tuple(value)


@attrs.frozen
class TrackSpec:
    """Where training metrics go besides the run directory's own ``metrics.jsonl``."""

    backend: str = attrs.field(default="none")
    """``"none"``, ``"wandb"`` (offline when no API key is set), ``"tensorboard"``, ``"mlflow"``, or several
    joined by ``+`` (``"tensorboard+mlflow"``)."""

    @backend.validator
    def _check_backend(self, attribute: attrs.Attribute, value: Any) -> None:
        parts = value.split("+") if isinstance(value, str) else [value]
        for part in parts:
            one_of(TRACKERS, "Join several with '+', e.g. 'tensorboard+mlflow'.")(self, attribute, part)
        if len(parts) > 1 and "none" in parts:
            _fail(attribute, value, "trackers without 'none'", "Drop 'none' from the list.")

    options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_freeze_options)
    """Backend options, e.g. ``project=`` / ``name=`` for W&B."""

    @options.validator
    def _check_options(self, attribute: attrs.Attribute, value: tuple[tuple[str, Any], ...]) -> None:
        for key, _ in value:
            if any(word in key.lower() for word in SECRET_OPTION_WORDS):
                raise ConfigError(
                    f"track(): option `{key}` looks like a secret; lorakit never stores secrets in run configs. "
                    "Set it in the environment instead (e.g. WANDB_API_KEY)."
                )

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


# --- evaluation, samples, checkpoints, early stopping (issue 5) -------------------------------------------

__all__ += ["CheckpointSpec", "EarlyStopSpec", "EvalSpec", "SampleSpec"]


def _to_metric_specs(value: Any) -> tuple[Any, ...]:
    from pathlib import Path

    if isinstance(value, (str, Path)) or callable(value):
        value = (value,)
    try:
        specs = tuple(str(v) if isinstance(v, Path) else v for v in value)
    except TypeError:
        raise ConfigError(
            f"`metrics` must be a metric or a list of them, e.g. ('perplexity', 'rouge'); got {value!r}."
        ) from None
    return specs


@attrs.frozen
class EvalSpec:
    """Evaluation during training: loss / perplexity on the validation split, generation metrics on a subset."""

    metrics: tuple[Any, ...] = attrs.field(default=("perplexity",), converter=_to_metric_specs)
    """Metric specs (see :mod:`lorakit.metrics`): names, callables, ``"module:function"``, evaluate paths."""
    every: int | None = attrs.field(default=None, validator=optional_positive_int("Or None for each epoch."))
    """Evaluate every N optimizer steps; ``None`` keeps ``with_training(eval_steps=...)`` (or each epoch)."""
    samples: int = attrs.field(default=64, validator=positive_int("Use e.g. samples=64."))
    """Validation rows (the first N, a fixed subset) generated for the text metrics."""
    max_new_tokens: int = attrs.field(default=64, validator=positive_int("Use e.g. max_new_tokens=64."))
    """Longest generated answer for the text metrics."""
    batch_size: int = attrs.field(default=8, validator=positive_int("Use e.g. batch_size=8."))
    """Prompts generated together; memory stays bounded by this, not by ``samples``."""

    @metrics.validator
    def _check_metrics(self, attribute: attrs.Attribute, value: tuple[Any, ...]) -> None:
        from lorakit.metrics import get_metric

        if not value:
            _fail(attribute, value, "at least one metric", "Use e.g. metrics=('perplexity', 'rouge').")
        for spec in value:
            get_metric(spec)  # unknown names and missing evaluate scripts fail at the builder call


@attrs.frozen
class SampleSpec:
    """Generation samples during training: fixed prompts, their generations logged at each evaluation."""

    prompts: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    """Prompt strings or rows; empty takes the first ``n`` validation rows."""
    n: int = attrs.field(default=4, validator=positive_int("Use e.g. n=4."))
    """How many validation rows to use when ``prompts`` is empty."""
    max_new_tokens: int = attrs.field(default=64, validator=positive_int("Use e.g. max_new_tokens=64."))
    """Longest generated sample."""
    every: int | None = attrs.field(
        default=None, validator=optional_positive_int("Or None to log at each evaluation.")
    )
    """Log every N optimizer steps; ``None`` logs at each evaluation (or, without one, every logging step x 10)."""

    @prompts.validator
    def _check_prompts(self, attribute: attrs.Attribute, value: tuple[Any, ...]) -> None:
        for index, prompt in enumerate(value):
            if not isinstance(prompt, (str, Mapping)):
                raise ConfigError(
                    f"`prompts[{index}]` must be a prompt string or a row dict, got {type(prompt).__name__}."
                )


@attrs.frozen
class CheckpointSpec:
    """Checkpoints: written atomically every N steps, best + latest kept, the best loaded at the end."""

    every: int = attrs.field(validator=positive_int("Use e.g. every=100."))
    """Write a checkpoint every N optimizer steps (evaluation then runs at the same steps)."""
    keep: int = attrs.field(default=2, validator=positive_int("2 keeps the best and the latest."))
    """``save_total_limit``: checkpoints kept on disk; the best and the latest are never deleted."""
    best_metric: str | None = attrs.field(default="eval_loss")
    """The metric that picks the best checkpoint (``eval_``-prefixed, e.g. ``"eval_rougeL"``); None for none."""
    load_best: bool = attrs.field(default=True, converter=bool)
    """Load the best checkpoint's adapter at the end and save that one in the run directory."""


@attrs.frozen
class EarlyStopSpec:
    """Stop when the watched metric has not improved for ``patience`` evaluations in a row."""

    patience: int = attrs.field(validator=positive_int("Use e.g. patience=3."))
    """Evaluations without improvement before stopping."""
    metric: str = attrs.field(default="eval_loss")
    """The metric watched (``"eval_loss"``, ``"eval_perplexity"``, ``"eval_rougeL"``, ...)."""
    mode: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(one_of(("min", "max"), "Or None to infer it."))
    )
    """``"min"`` or ``"max"``; ``None`` infers ``min`` for losses and perplexity, ``max`` otherwise."""
    min_delta: float = attrs.field(default=0.0, converter=_to_float, validator=number_in(0.0, 1e9))
    """An improvement must beat the best so far by more than this."""

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``."""
        if self.mode is not None:
            return self.mode
        lowered = self.metric.lower()
        return "min" if ("loss" in lowered or "perplexity" in lowered) else "max"


def eval_key(metric: str) -> str:
    """``"rougeL"`` -> ``"eval_rougeL"``: the name an evaluation metric is logged under."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


@attrs.frozen
class StartSpec:
    """The earlier run a pipeline starts from (set by :meth:`lorakit.Pipeline.from_run`)."""

    path: str
    """The earlier run's directory."""
    adapter: bool = True
    """The run saved an adapter, which keeps training; False: it saved a whole model, which is the new base."""
    template: Any = attrs.field(default=None, eq=False, repr=False)
    """The earlier run's prompt template (``with_dataset()``'s default); not part of the config."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "adapter": self.adapter}


__all__ += ["StartSpec"]

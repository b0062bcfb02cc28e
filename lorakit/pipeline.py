"""The fluent, immutable builder: describe a fine-tuning run, then ``explain()`` or ``train()`` it.

Every call returns a new :class:`Pipeline` (``attrs.evolve``) and validates its arguments at once, so a
mistake fails at the line that made it, not an hour into a run::

    import lorakit as lk

    run = (lk.Pipeline.from_model("smollm2-135m")
             .with_lora(r=16, alpha=32, targets="all-linear")
             .with_dataset("data.jsonl", template="alpaca", val_split=0.1)
             .with_training(epochs=3, lr=2e-4, batch_size=4, grad_accum=4)
             .train("runs/support-bot"))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import (
    CheckpointSpec,
    DataSpec,
    EarlyStopSpec,
    EvalSpec,
    ModelSpec,
    QuantSpec,
    SampleSpec,
    StartSpec,
    TrackSpec,
    TrainSpec,
)
from lorakit.configfile import check_remote_code, config_file_path, read_config_file, write_config_file
from lorakit.data import prepare_data, preview_examples
from lorakit.data.load import SUFFIXES
from lorakit.data.preference import prepare_preference_data, preview_rows
from lorakit.distributed import DistributedSpec, check_spec_against, check_trainer_options
from lorakit.errors import ConfigError
from lorakit.methods import (
    METHODS,
    AdaLoraSpec,
    FullSpec,
    Ia3Spec,
    LoraSpec,
    MethodSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    PtuningSpec,
    PtuningV2Spec,
    method_from_dict,
    supports_grad_checkpointing,
)
from lorakit.metrics import metric_name
from lorakit.models import check_model_options, current_device, load_tokenizer, resolve_model_path
from lorakit.noise import quiet
from lorakit.plan import make_plan, resolve_for_run
from lorakit.preference import PreferenceSpec, check_method
from lorakit.rundir import RunDir, read_run
from lorakit.templates import get_template, template_from_dict
from lorakit.tracking.secrets import redact

if TYPE_CHECKING:
    from lorakit.data import DataReport, PreparedData, Preview
    from lorakit.plan import Plan
    from lorakit.training import TrainResult

__all__ = ["Pipeline"]

CONFIG_VERSION = 1


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()

_EXTRA_SECTIONS: dict[str, Any] = {
    "evaluation": EvalSpec,
    "samples": SampleSpec,
    "checkpoints": CheckpointSpec,
    "early_stop": EarlyStopSpec,
    "preference": PreferenceSpec,
    "start": StartSpec,
}
"""Optional config sections: Pipeline field -> spec class."""


def _looks_like_a_file(path: str) -> bool:
    """A path with a data-file extension or a separator-led form; other strings may be Hub dataset ids."""
    return Path(path).suffix.lower() in SUFFIXES or path.startswith((".", "/", "~"))


def _check_data_arguments(source: Any, val: Any, template: Any) -> None:
    """``with_dataset()``: a missing data file or an unknown template name fails at the call."""
    for name, value in (("source", source), ("val", val)):
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str) and not Path(value).expanduser().exists() and _looks_like_a_file(value):
            raise ConfigError(
                f"with_dataset({name}={value!r}): no such file. Pass a .json, .jsonl, .csv, .tsv, .parquet "
                "or .txt path, a directory, or a Hub dataset id."
            )
    if isinstance(template, str):
        get_template(template)  # unknown names fail here, listing the known ones


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not _UNSET}


def _distribution(section: Mapping[str, Any] | None) -> DistributedSpec | None:
    if not section:
        return None
    return DistributedSpec(**section)


def _specs_from_config(config: Mapping[str, Any], *, trust_template_classes: bool) -> dict[str, Any]:
    """The Pipeline fields of a config mapping (sections checked, specs built)."""
    known = {"lorakit_config", "model", "method", "quant", "data", "training", "tracking", "distributed"}
    unknown = set(config) - known - set(_EXTRA_SECTIONS)
    if unknown:
        raise ConfigError(f"Unknown config sections: {', '.join(sorted(unknown))}.")
    data = config.get("data")
    if data is not None:
        data = dict(data)
        if isinstance(data.get("template"), Mapping):
            data["template"] = template_from_dict(
                data["template"], trust_template_classes=trust_template_classes
            )
    tracking = dict(config.get("tracking") or {"backend": "none"})
    if "seed" in (config.get("training") or {}):
        _check_seed(config["training"]["seed"], config=True)
    try:
        return dict(
            model=ModelSpec(**config["model"]) if config.get("model") else None,
            method=method_from_dict(config["method"]) if config.get("method") else None,
            quant=QuantSpec(**config["quant"]) if config.get("quant") else None,
            data=DataSpec(**data) if data else None,
            training=TrainSpec(**(config.get("training") or {})),
            tracking=TrackSpec(tracking.pop("backend"), tracking),
            distribution=_distribution(config.get("distributed")),
            **{
                field: spec_class(**config[field])
                for field, spec_class in _EXTRA_SECTIONS.items()
                if config.get(field)
            },
        )
    except TypeError as error:
        raise ConfigError(f"Invalid pipeline config: {error}") from error


_MAX_SEED = 2**32 - 1  # numpy's seeds (transformers' set_seed seeds random, numpy and torch together)


def _check_seed(seed: Any, *, config: bool = False) -> None:
    """A training seed numpy accepts: an integer in 0..2**32-1 (refused here, not inside ``set_seed`` later)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        where = f"training.seed: {seed!r}" if config else f"with_training(seed={seed!r})"
        raise ConfigError(
            f"{where}: the seed must be an integer from 0 to 2**32-1 ({_MAX_SEED}), the range "
            "numpy accepts. Use e.g. seed=42."
        )


def _check_grad_checkpointing(method: MethodSpec, training: TrainSpec, *, second: str) -> None:
    """Refuse an explicit ``grad_checkpointing=True`` with a method that cannot train with it."""
    if training.grad_checkpointing is not True or supports_grad_checkpointing(method):
        return
    gc_call = "with_training(grad_checkpointing=True)"
    if second == gc_call:
        conflict = f"{gc_call} conflicts with the earlier with_{method.name}()"
    elif second.startswith("with_"):
        conflict = f"{second} conflicts with the earlier {gc_call}"
    else:
        conflict = f"{second}: method {method.name!r} conflicts with training.grad_checkpointing=True"
    raise ConfigError(
        f"{conflict}: {method.name} cannot train with gradient checkpointing (PEFT's prefix key/values and the "
        "recomputed forward disagree on sequence lengths). Use grad_checkpointing=None (lorakit then turns it "
        "off for prefix methods) or False, or a method that supports it (prompt_tuning, ptuning, lora)."
    )


def _check_quantization(method: MethodSpec | None, quant: QuantSpec | None, *, final: bool) -> None:
    """The method's rule on quantization (LoftQ needs 4-bit, full fine-tuning none); see its hook.

    A missing quantization is only an error once the pipeline is final (train(), plan(), a config file): the
    ``quantize_4bit()`` call may still follow ``with_lora()``.
    """
    if method is not None:
        method.check_quantization(quant, final=final)


@attrs.frozen
class Pipeline:
    """A description of a fine-tuning run. Build it with :meth:`from_model` and the ``with_*`` calls."""

    model: ModelSpec | None = None
    """The base model (set by :meth:`from_model`)."""
    method: MethodSpec | None = None
    """The adapter method; ``None`` means LoRA with its defaults."""
    quant: QuantSpec | None = None
    """Quantization of the frozen base weights, if any."""
    data: DataSpec | None = None
    """Training data (set by :meth:`with_dataset`)."""
    training: TrainSpec = attrs.field(factory=TrainSpec)
    """Optimisation settings."""
    tracking: TrackSpec = attrs.field(factory=TrackSpec)
    """Experiment tracking backend."""
    distribution: DistributedSpec | None = None
    """Multi-process / multi-machine set-up (set by :meth:`distributed`); None trains as launched."""
    evaluation: EvalSpec | None = None
    """Evaluation during training (set by :meth:`with_eval`)."""
    samples: SampleSpec | None = None
    """Generation samples logged during training (set by :meth:`log_samples`)."""
    checkpoints: CheckpointSpec | None = None
    """Atomic checkpoints, best + latest kept (set by :meth:`with_checkpoints`)."""
    early_stop: EarlyStopSpec | None = None
    """Early stopping on an evaluation metric (set by :meth:`early_stopping`)."""
    preference: PreferenceSpec | None = None
    """A preference objective instead of SFT (set by :meth:`with_preference`)."""
    start: StartSpec | None = None
    """The earlier run this one continues from (set by :meth:`from_run`)."""

    # --- building -----------------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        name_or_path: str,
        *,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        attention: str = "auto",
        model_options: Mapping[str, Any] | None = None,
    ) -> Pipeline:
        """Start a pipeline from a base model.

        Args:
            name_or_path: a local model directory, a Hugging Face model id (needs network), or the embedded
                alias ``"smollm2-135m"`` (SmolLM2-135M-Instruct, offline).
            dtype: weight dtype when not quantized; ``"auto"`` follows the training precision.
            trust_remote_code: allow modelling code shipped with the checkpoint.
            revision: branch, tag or commit of a Hub repository.
            attention: ``"auto"`` (flash-attention 2 when ``flash_attn`` is installed and the GPU supports it,
                else transformers' default, SDPA), ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
            model_options: more ``from_pretrained`` keyword arguments (e.g. ``{"use_cache": False}``); keys
                that are not keywords of the installed transformers or config attributes are a ConfigError
                naming close matches, keys lorakit sets itself (dtype, quantization, device_map, ...) too.
        """
        spec = ModelSpec(
            name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
            attention=attention,
            options=model_options,
        )
        if spec.options:
            check_model_options(spec.option_dict)  # keys lorakit owns; the rest once the config is read
        return cls(model=spec)

    def with_lora(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        targets: str | tuple[str, ...] = "all-linear",
        bias: str = "none",
        *,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
        layers: tuple[int, ...] | None = None,
        modules_to_save: tuple[str, ...] | None = None,
    ) -> Pipeline:
        """Train LoRA adapters (the default method). See :class:`lorakit.methods.LoraSpec` for each field."""
        return self._with_method(
            LoraSpec(
                r=r,
                alpha=alpha,
                dropout=dropout,
                targets=targets,
                bias=bias,
                use_dora=use_dora,
                use_rslora=use_rslora,
                init=init,
                layers=layers,
                modules_to_save=modules_to_save,
            )
        )

    def with_ia3(
        self, targets: tuple[str, ...] | None = None, feedforward: tuple[str, ...] | None = None
    ) -> Pipeline:
        """Train IA3 scaling vectors. See :class:`lorakit.methods.Ia3Spec`."""
        return self._with_method(Ia3Spec(targets=targets, feedforward=feedforward))

    def with_prompt_tuning(self, num_virtual_tokens: int = 20, init_text: str | None = None) -> Pipeline:
        """Train virtual-token embeddings prepended to every input. See :class:`lorakit.methods.PromptTuningSpec`.

        ``init_text`` starts the virtual tokens at the embeddings of that text's tokens (repeated or cut to
        ``num_virtual_tokens``), e.g. ``"Classify the topic of this ticket:"``; the base model's own tokenizer
        embeds it, offline for a local model directory.
        """
        return self._with_method(PromptTuningSpec(num_virtual_tokens=num_virtual_tokens, init_text=init_text))

    def with_ptuning(
        self,
        num_virtual_tokens: int = 20,
        encoder_hidden_size: int = 128,
        encoder_type: str = "mlp",
        *,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ) -> Pipeline:
        """Train P-tuning (v1): virtual tokens produced by an MLP or LSTM encoder. See
        :class:`lorakit.methods.PtuningSpec`."""
        return self._with_method(
            PtuningSpec(
                num_virtual_tokens=num_virtual_tokens,
                encoder_hidden_size=encoder_hidden_size,
                encoder_type=encoder_type,
                encoder_num_layers=encoder_num_layers,
                encoder_dropout=encoder_dropout,
            )
        )

    def with_prefix_tuning(
        self, num_virtual_tokens: int = 20, projection: bool = False, encoder_hidden_size: int | None = None
    ) -> Pipeline:
        """Train key/value prefixes in every attention layer. See :class:`lorakit.methods.PrefixTuningSpec`.

        Prefix methods train without gradient checkpointing (see docs/methods.md).
        """
        return self._with_method(
            PrefixTuningSpec(
                num_virtual_tokens=num_virtual_tokens,
                projection=projection,
                encoder_hidden_size=encoder_hidden_size,
            )
        )

    def with_ptuning_v2(
        self, num_virtual_tokens: int = 20, encoder_hidden_size: int | None = None
    ) -> Pipeline:
        """Train P-tuning v2 (deep prompt tuning): prefix tuning with the reparameterisation MLP. See
        :class:`lorakit.methods.PtuningV2Spec`. Trains without gradient checkpointing."""
        return self._with_method(
            PtuningV2Spec(num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=encoder_hidden_size)
        )

    def with_adalora(
        self,
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 32,
        dropout: float = 0.05,
        targets: str | tuple[str, ...] = "all-linear",
        *,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,  # noqa: N803 (PEFT's name)
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
    ) -> Pipeline:
        """Train AdaLoRA: LoRA whose rank budget shrinks from ``init_r`` to an average of ``target_r`` per layer,
        keeping the most important singular directions. See :class:`lorakit.methods.AdaLoraSpec`.

        The schedule is counted in optimizer steps: ``tinit`` warm-up steps at full rank, then the budget
        shrinks until ``tfinal`` steps before the end. ``train()`` fills in the run's step count from the data
        and :meth:`with_training`; ``tinit + tfinal`` must be less than it.
        """
        return self._with_method(
            AdaLoraSpec(
                init_r=init_r,
                target_r=target_r,
                alpha=alpha,
                dropout=dropout,
                targets=targets,
                tinit=tinit,
                tfinal=tfinal,
                deltaT=deltaT,
                beta1=beta1,
                beta2=beta2,
                orth_reg_weight=orth_reg_weight,
            )
        )

    def full_finetune(self) -> Pipeline:
        """Train the model's own weights, all of them, with no adapter (needs memory for the weights, their
        gradients and two optimizer states). The run directory then holds the whole model.

        After :meth:`freeze` this keeps the freeze (``freeze()`` already means full fine-tuning of the unfrozen
        part). Cannot be combined with ``quantize_4bit()`` / ``quantize_8bit()``.
        """
        if self.method is not None and not self.method.has_adapter:
            return self
        return self._with_method(FullSpec())

    def freeze(
        self,
        train_last_n_layers: int | None = None,
        *,
        modules: tuple[str, ...] | None = None,
        final_norm: bool = True,
    ) -> Pipeline:
        """Full fine-tuning of part of the model: everything else keeps ``requires_grad=False``.

        Pass exactly one of ``train_last_n_layers`` (the last N decoder layers, plus the final norm unless
        ``final_norm=False``) or ``modules`` (module names, full or their last parts: ``("lm_head",)``,
        ``("layers.1.mlp", "norm")``). N is checked against the model's layer count when the plan is made or
        training starts. There is no adapter: the run saves the whole model, as :meth:`full_finetune`. To put
        LoRA on some layers only, use ``with_lora(layers=..., targets=...)`` instead.
        """
        if (train_last_n_layers is None) == (modules is None):
            raise ConfigError(
                "freeze() takes exactly one of train_last_n_layers=N or modules=(...), got "
                f"train_last_n_layers={train_last_n_layers!r}, modules={modules!r}. "
                "Example: freeze(train_last_n_layers=2) or freeze(modules=('lm_head',))."
            )
        return self._with_method(
            FullSpec(train_last_n_layers=train_last_n_layers, modules=modules, final_norm=final_norm)
        )

    def with_method(self, name: str, **options: Any) -> Pipeline:
        """Train the registered adapter method ``name`` with ``options`` (see ``lorakit.methods.METHODS``)."""
        if name not in METHODS:
            raise ConfigError(f"Unknown adapter method {name!r}; known: {', '.join(sorted(METHODS))}.")
        try:
            spec = METHODS[name](**options)
        except TypeError as error:
            raise ConfigError(
                f"with_method({name!r}, ...): {error}. See {METHODS[name].__name__}."
            ) from error
        return self._with_method(spec)

    def quantize_4bit(
        self, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str | None = None
    ) -> Pipeline:
        """Load the frozen base weights in 4 bits with bitsandbytes (QLoRA). Needs ``lorakit[qlora]``."""
        return self._with_quant(
            QuantSpec(bits=4, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
        )

    def quantize_8bit(self) -> Pipeline:
        """Load the frozen base weights in 8 bits with bitsandbytes (LLM.int8). Needs ``lorakit[qlora]``."""
        return self._with_quant(QuantSpec(bits=8))

    def with_dataset(
        self,
        source: Any,
        *,
        template: Any = _UNSET,
        val_split: float = 0.1,
        max_length: int = 1024,
        seed: int = 42,
        train_on_inputs: bool = False,
        val: Any = None,
        format: str | None = None,
        columns: Mapping[str, str] | None = None,
        on_overflow: str = "truncate_prompt",
        on_bad_row: str = "error",
        dedup: bool = True,
        min_chars: int | None = None,
        max_chars: int | None = None,
        text_unit: str = "line",
        packing: bool = False,
        num_proc: int | None = None,
        cache: bool = True,
        config: str | None = None,
        split: str | None = None,
        streaming: bool = False,
    ) -> Pipeline:
        """Set the training data.

        Args:
            source: a .json / .jsonl / .csv / .tsv / .parquet / .txt path, a directory (``save_to_disk`` output
                or .txt files), a Hub dataset id, a list of dicts, a pandas DataFrame, or a
                ``datasets.Dataset`` / ``DatasetDict`` (its ``train`` split). Rows in alpaca
                (instruction / input / output), prompt / completion, ``messages``, ShareGPT
                (``conversations``) or ``text`` form.
            template: ``"auto"`` (the default: the tokenizer's own chat template when it has one, else
                ``"alpaca"``; ``explain()`` shows which), a name from :mod:`lorakit.templates` (``"alpaca"``,
                ``"chatml"``, ``"llama2"``, ``"llama3"``, ``"mistral"``, ``"zephyr"``, ``"gemma"``, ``"phi3"``,
                ``"vicuna"``, ``"model"`` for the tokenizer's own chat template), a Jinja chat template string,
                or a template object.
            val_split: fraction of rows held out for validation (0 for none).
            max_length: longest tokenized example (see ``on_overflow``).
            seed: seed of the split.
            train_on_inputs: also train on prompt tokens (by default only responses and their EOS are trained).
            val: an explicit validation source (any kind ``source`` accepts); replaces ``val_split``.
            format: ``"alpaca"``, ``"prompt_completion"``, ``"messages"``, ``"sharegpt"`` or ``"text"``;
                detected from the columns when None.
            columns: ``{lorakit field: your column}``, e.g. ``{"instruction": "question", "output": "answer"}``.
            on_overflow: ``"truncate_prompt"`` (keep the response, cut the prompt from the left),
                ``"truncate"`` (cut the end), ``"drop"`` or ``"error"``. Cut and dropped rows are counted.
            on_bad_row: ``"error"`` (raise on a malformed row) or ``"skip"`` (skip and count it).
            dedup: drop exact duplicate rows (counted).
            min_chars: drop rows with less text than this (counted).
            max_chars: drop rows with more text than this (counted).
            text_unit: plain-text files: one document per ``"line"`` or per ``"file"``.
            packing: pack examples into ``max_length`` sequences; batches are padding-free with per-example
                position ids, so packed examples never attend to each other.
            num_proc: processes for tokenization.
            cache: reuse the tokenized data of an identical earlier run.
            config: Hub datasets: the configuration (subset) name for ``datasets.load_dataset``.
            split: Hub datasets: the split to train on (default ``"train"``), e.g. ``"train[:5%]"``.
            streaming: Hub datasets: stream instead of downloading; only the rows ``max_steps`` consumes are
                read, so it needs ``with_training(max_steps=...)``.
        """
        if template is _UNSET:  # the earlier run's template after from_run(), else "auto"
            template = self.start.template if self.start is not None and self.start.template else "auto"
        _check_data_arguments(source, val, template)
        # Every argument is the DataSpec field of the same name.
        options = {name: value for name, value in locals().items() if name not in ("self", "source")}
        return attrs.evolve(self, data=DataSpec(source, **options))

    def with_training(
        self,
        epochs: float = _UNSET,
        max_steps: int | None = _UNSET,
        lr: float = _UNSET,
        batch_size: int = _UNSET,
        grad_accum: int = _UNSET,
        scheduler: str = _UNSET,
        warmup_ratio: float = _UNSET,
        weight_decay: float = _UNSET,
        grad_checkpointing: bool | None = _UNSET,
        precision: str = _UNSET,
        seed: int = _UNSET,
        logging_steps: int = _UNSET,
        eval_steps: int | None = _UNSET,
        save_steps: int | None = _UNSET,
        group_by_length: bool = _UNSET,
        optim: str = _UNSET,
        compile: bool | str = _UNSET,
        fused_loss: bool = _UNSET,
        liger: bool | None = _UNSET,
        trainer_options: Mapping[str, Any] | None = _UNSET,
        padding_free: bool | str = _UNSET,
    ) -> Pipeline:
        """Set optimisation hyper-parameters; arguments not passed keep their current value.

        Defaults: epochs=3, max_steps=None, lr=2e-4, batch_size=4, grad_accum=1, scheduler="cosine",
        warmup_ratio=0.03, weight_decay=0.0, grad_checkpointing=None (on for GPU, off on CPU),
        precision="auto" (bf16/fp16 on a GPU; on CPU bf16 autocast where native, else fp32), seed=42,
        logging_steps=10, eval_steps=None (each epoch), save_steps=None (final adapter only), optim="auto"
        (paged_adamw_8bit for QLoRA on a GPU, adamw_torch_fused otherwise; the run record's ``optimizer`` says
        which), group_by_length=True (batches of similar lengths, little
        padding), compile=False (``True`` / ``"auto"``: ``torch.compile`` the decoder layers), fused_loss=True
        (the loss without full-vocabulary logits), liger=None (Liger kernels via TRL's use_liger_kernel when
        liger_kernel is installed on a GPU run), padding_free="auto" (each batch concatenated into one row with
        per-example position_ids: on with flash-attention 2, off with SDPA / eager unless ``True``).
        ``trainer_options`` are more TRL ``SFTConfig`` fields (e.g. ``{"max_grad_norm": 0.3,
        "neftune_noise_alpha": 5}``): unknown fields are a ConfigError naming close matches, fields a lorakit
        setting owns too (it names that setting). See :class:`lorakit.config.TrainSpec`.
        """
        changes = _given(
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            scheduler=scheduler,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            grad_checkpointing=grad_checkpointing,
            precision=precision,
            seed=seed,
            logging_steps=logging_steps,
            eval_steps=eval_steps,
            save_steps=save_steps,
            group_by_length=group_by_length,
            optim=optim,
            compile=compile,
            fused_loss=fused_loss,
            liger=liger,
            padding_free=padding_free,
        )
        if "seed" in changes:
            _check_seed(changes["seed"])
        if trainer_options is not _UNSET:
            check_trainer_options(dict(trainer_options or {}))
            changes["options"] = trainer_options
        training = attrs.evolve(self.training, **changes)
        if self.method is not None and changes.get("grad_checkpointing") is True:
            _check_grad_checkpointing(self.method, training, second="with_training(grad_checkpointing=True)")
        return attrs.evolve(self, training=training)

    def track(self, backend: str = "none", **options: Any) -> Pipeline:
        """Send metrics to ``"wandb"`` (online if logged in, else offline), ``"tensorboard"``, or ``"none"``.

        The run directory always gets ``metrics.jsonl``. Options go to the backend (W&B: ``project``, ``name``,
        ``entity``, ``tags``); secrets are refused: put API keys in the environment.
        """
        return attrs.evolve(self, tracking=TrackSpec(backend, options))

    def distributed(
        self,
        strategy: str = "ddp",
        *,
        num_processes: int = 2,
        num_machines: int = 1,
        main_process_ip: str | None = None,
        main_process_port: int = 29500,
        zero_stage: int | None = None,
        sharding: str = "full_shard",
        cpu_offload: bool = False,
    ) -> Pipeline:
        """Train data-parallel through accelerate: ``"ddp"``, ``"fsdp"`` (QLoRA shards too) or ``"deepspeed"``.

        ``lorakit.distributed.launch(pipeline, dir)`` starts the processes (torchrun + gloo on CPU, accelerate
        on GPUs); ``lorakit.distributed.accelerate_config(pipeline)`` / ``training_arguments(pipeline)`` give the
        generated configuration. FSDP and DeepSpeed need CUDA GPUs. See docs/distributed.md.
        """
        spec = DistributedSpec(
            strategy,
            num_processes=num_processes,
            num_machines=num_machines,
            main_process_ip=main_process_ip,
            main_process_port=main_process_port,
            zero_stage=zero_stage,
            sharding=sharding,
            cpu_offload=cpu_offload,
        )
        check_spec_against(self, spec)
        return attrs.evolve(self, distribution=spec)

    # --- evaluation, samples, checkpoints (issue 5) ------------------------------------------------------

    def with_eval(
        self,
        metrics: Any = ("perplexity",),
        *,
        every: int | None = None,
        samples: int = 64,
        max_new_tokens: int = 64,
        batch_size: int = 8,
    ) -> Pipeline:
        """Evaluate during training: loss and perplexity on the whole validation split, and generation metrics
        (``"rouge"``, ``"bleu"``, ``"chrf"``, ``"exact_match"``, ``"accuracy"``, callables, local ``evaluate``
        modules; see :mod:`lorakit.metrics`) on its first ``samples`` rows.

        Generation runs in batches of ``batch_size`` prompts of at most ``max_new_tokens`` new tokens, and no
        logits are kept across batches, so memory does not grow with the validation set. Results are logged as
        ``eval_<metric>`` to ``metrics.jsonl`` and the tracker. ``every`` sets the evaluation interval in steps
        (default: ``with_training(eval_steps=...)``, else each epoch).
        """
        spec = EvalSpec(
            metrics=metrics,
            every=every,
            samples=samples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        return attrs.evolve(self, evaluation=spec)

    def log_samples(
        self,
        prompts: Any = (),
        *,
        n: int = 4,
        max_new_tokens: int = 64,
        every: int | None = None,
    ) -> Pipeline:
        """Log generations for a few fixed prompts during training: a W&B table, TensorBoard text and
        ``samples.jsonl`` in the run directory. Without ``prompts`` the first ``n`` validation rows are used.
        """
        if isinstance(prompts, (str, Mapping)):
            prompts = (prompts,)
        spec = SampleSpec(prompts=prompts, n=n, max_new_tokens=max_new_tokens, every=every)
        return attrs.evolve(self, samples=spec)

    def with_checkpoints(
        self, every: int, *, keep: int = 2, best_metric: str | None = "eval_loss", load_best: bool = True
    ) -> Pipeline:
        """Write a checkpoint every ``every`` steps (atomically: written aside, then renamed), keep ``keep`` of
        them — the best by ``best_metric`` and the latest are never deleted — and, with ``load_best``, end
        with the best adapter. ``train(dir, resume=True)`` continues from the latest one.
        """
        spec = CheckpointSpec(every=every, keep=keep, best_metric=best_metric, load_best=load_best)
        return attrs.evolve(self, checkpoints=spec)

    def early_stopping(
        self, patience: int = 3, metric: str = "eval_loss", *, mode: str | None = None, min_delta: float = 0.0
    ) -> Pipeline:
        """Stop training when ``metric`` has not improved (by more than ``min_delta``) for ``patience``
        evaluations in a row. ``mode`` is ``"min"`` / ``"max"``; by default ``min`` for losses and perplexity.
        """
        spec = EarlyStopSpec(patience=patience, metric=metric, mode=mode, min_delta=min_delta)
        return attrs.evolve(self, early_stop=spec)

    # --- preference tuning and continuing an earlier run (issue 18) -----------------------------------------

    def with_preference(self, objective: str = "dpo", *, beta: float = 0.1, **options: Any) -> Pipeline:
        """Train a preference objective on ``prompt`` / ``chosen`` / ``rejected`` rows (``"dpo"``, ``"orpo"``,
        ``"cpo"``) or unpaired ``prompt`` / ``completion`` / ``label`` rows (``"kto"``) instead of SFT.

        TRL's trainer of that objective runs the loop; the rows are rendered with the run's template exactly as
        SFT renders them. ``beta`` is the objective's temperature; ``options`` are more fields of TRL's config
        (e.g. ``loss_type="ipo"``, see :data:`lorakit.preference.OBJECTIVES`). The reference model of DPO / KTO
        is the policy with its adapter disabled, or after :meth:`from_run` the starting adapter kept frozen:
        never a second copy of the base. See docs/preference.md.
        """
        spec = PreferenceSpec(objective, beta=beta, options=options)
        return attrs.evolve(self, preference=spec)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, *, trust_remote_code: bool = False, trust_template_classes: bool = False
    ) -> Pipeline:
        """Start from an earlier run: its base model, quantization and template, and its adapter as the starting
        point that keeps training (SFT -> DPO, or SFT -> SFT on new data). A run that saved a whole model (full
        fine-tuning) becomes the base model of the new run. The new run records this one as its parent.

        Reading the run runs no code by surprise, as :meth:`lorakit.InferenceModel.load`: a record with
        ``trust_remote_code: true`` needs ``trust_remote_code=True``, a template with an unregistered class
        ``trust_template_classes=True``.
        """
        rundir = RunDir(Path(run_dir).expanduser())
        record = read_run(rundir.path)
        if record is None:
            raise ConfigError(
                f"{rundir.path} is a plain PEFT adapter without a lorakit run record; from_run() needs a run "
                "lorakit trained. Start from Pipeline.from_model(base) instead."
            )
        check_remote_code(
            record.get("pipeline") or {},
            source=f"Run record {rundir.run_file}",
            trust_remote_code=trust_remote_code,
        )
        parent = cls.from_config(
            record["pipeline"],
            trust_remote_code=trust_remote_code,
            trust_template_classes=trust_template_classes,
        )
        template = record.get("template")
        if isinstance(template, Mapping):
            template = template_from_dict(template, trust_template_classes=trust_template_classes)
        assert parent.model is not None
        if rundir.is_adapter():
            start = StartSpec(str(rundir.path), adapter=True, template=template)
            return cls(model=parent.model, method=parent.method, quant=parent.quant, start=start)
        model = attrs.evolve(parent.model, name_or_path=str(rundir.path), revision=None)
        return cls(model=model, start=StartSpec(str(rundir.path), adapter=False, template=template))

    def _with_method(self, spec: MethodSpec) -> Pipeline:
        if self.start is not None and self.start.adapter and spec != self.method:
            raise ConfigError(
                f"{spec.builder_call()} after from_run({self.start.path!r}): that run's adapter "
                f"({self.resolved_method.builder_call()}) keeps training, so the method and its settings are "
                "the earlier run's. To train a new adapter, start from Pipeline.from_model(...)."
            )
        if self.method is not None and self.method.name != spec.name:
            hint = ""
            if "full" in (spec.name, self.method.name):
                hint = (
                    " freeze() and full_finetune() train the model's own weights without an adapter; to train "
                    "LoRA on some layers only, use with_lora(layers=..., targets=...)."
                )
            raise ConfigError(
                f"{spec.builder_call()} conflicts with the earlier {self.method.builder_call()}: a run trains one "
                f"adapter method. Remove one of the two calls.{hint}"
            )
        _check_grad_checkpointing(spec, self.training, second=f"with_{spec.name}()")
        return attrs.evolve(self, method=spec)

    def _with_quant(self, spec: QuantSpec) -> Pipeline:
        if self.quant is not None and self.quant.bits != spec.bits:
            raise ConfigError(
                f"{spec.method_name} conflicts with the earlier {self.quant.method_name}: the base weights are "
                "quantized one way. Remove one of the two calls."
            )
        return attrs.evolve(self, quant=spec)

    def __attrs_post_init__(self) -> None:
        # Rules between calls run on every new pipeline, so they fail at whichever call comes second
        # (and when a config file is read).
        method, quant = self.method, self.quant
        _check_quantization(method, quant, final=False)
        check_method(self.preference, method)
        if self.preference is not None and self.evaluation is not None:
            raise ConfigError(
                "with_eval() measures the SFT loss and generations; a preference run evaluates its own objective "
                "(eval_loss, eval_rewards/accuracies, eval_rewards/margins, ...) on the validation split. Remove "
                "with_eval(); early_stopping() and with_checkpoints(best_metric=...) take those keys."
            )
        if method is not None:
            method.check_schedule(
                self.training.max_steps, self.data.source if self.data is not None else None
            )

    # --- resolved views -----------------------------------------------------------------------------------

    @property
    def resolved_method(self) -> MethodSpec:
        """The adapter method that will train (LoRA with defaults when none was chosen)."""
        return self.method if self.method is not None else LoraSpec()

    def require(self, *, data: bool = True) -> None:
        """Raise ConfigError if a call the terminal operation needs is missing."""
        if self.model is None:
            raise ConfigError(
                "No base model: start with lk.Pipeline.from_model('smollm2-135m') or a model path."
            )
        if data and self.data is None:
            raise ConfigError("No training data: add .with_dataset('data.jsonl') before train().")
        _check_quantization(self.method, self.quant, final=True)

    # --- terminal calls -----------------------------------------------------------------------------------

    def plan(self) -> Plan:
        """The resolved plan with numbers, computed from the model config on the meta device (no weights).

        Besides exact parameter counts, ``plan().memory`` is a :class:`~lorakit.memory.MemoryEstimate`: the bytes
        of the base weights as stored (dtype, or bitsandbytes 4/8-bit layout with its constants), the adapter, its
        gradients and optimizer state, and an activation estimate for one micro-batch of ``max_length`` tokens
        (see docs/memory.md for how each is computed and what is not modelled).
        """
        with quiet():  # third-party deprecations lorakit triggers while planning (listed in lorakit/noise.py)
            return make_plan(self)

    def explain(self) -> str:
        """The resolved plan as text: model, method, target modules, parameter counts, rows, steps and memory.

        The memory line reads e.g. ``weights 168.4 MB, adapter 19.5 MB, grads 19.5 MB, optimizer 39.1 MB,
        activations ~1.1 GB (batch 4 x 1024) = ~1.4 GB``; no weights are loaded to compute it.
        """
        return self.plan().render()

    def train(
        self,
        output_dir: str | Path,
        *,
        overwrite: bool = False,
        callbacks: list[Any] | None = None,
        resume: bool | str | Path = False,
    ) -> TrainResult:
        """Load, train with TRL's SFTTrainer, and write the run directory.

        The run directory holds the adapter in PEFT format, the tokenizer, ``lorakit_run.json`` (this
        pipeline's config, the template and the data report), ``metrics.json`` and ``metrics.jsonl``.
        A non-empty ``output_dir`` is refused unless ``overwrite=True``. ``callbacks`` are extra
        ``transformers.TrainerCallback`` objects handed to the trainer.

        ``resume=True`` continues the run in ``output_dir`` from its latest checkpoint (``resume="path"``: from
        that checkpoint or run directory) with the optimizer, scheduler, RNG and data position restored, after
        checking that this pipeline's config and data fingerprint equal the checkpoint's.
        """
        # lorakit.training imports TRL (the trainer subclasses SFTTrainer): loaded when a run starts, so that
        # building, planning and explaining a pipeline stays light. Not a cycle: training never imports pipeline.
        with quiet():  # importing PEFT imports bitsandbytes, whose notices lorakit reports in its own words
            from lorakit.training import run_training

        self.require()
        resolved = resolve_for_run(self, current_device())  # streamed row counts
        return run_training(
            resolved, Path(output_dir), overwrite=overwrite, callbacks=callbacks, resume=resume
        )

    def prepare_data(self) -> PreparedData:
        """Tokenize the data exactly as ``train()`` would (loads the tokenizer only, no weights).

        Returns a :class:`lorakit.data.PreparedData` with ``.train`` / ``.val`` (``datasets.Dataset`` with
        ``input_ids`` and ``labels``) and ``.report``.
        """
        tokenizer, template = self._tokenizer_and_template()
        assert self.data is not None
        if self.preference is not None:
            return self._preference_data(tokenizer, template)
        return prepare_data(
            self._source(), tokenizer=tokenizer, template=template, **self.data.prepare_kwargs()
        )

    def preview(self, n: int = 3) -> Preview:
        """The first ``n`` training examples as the model sees them, trained tokens highlighted.

        ``print()`` it in a terminal (trained tokens in green, or between ``[[ ]]`` without colour); a
        notebook shows it as HTML. Examples are shown unpacked, even with ``packing=True``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"preview(n) needs a positive integer, got {n!r}.")
        tokenizer, template = self._tokenizer_and_template()
        assert self.data is not None
        if self.preference is not None:  # chosen, then rejected, completion tokens marked
            rows = preview_rows(self._preference_data(tokenizer, template).train, n)
            return preview_examples(rows, tokenizer)
        options = {**self.data.prepare_kwargs(), "packing": False}
        prepared = prepare_data(self._source(), tokenizer=tokenizer, template=template, **options)
        return preview_examples(
            prepared.train.select(range(min(n, len(prepared.train)))).to_list(), tokenizer
        )

    def audit(self) -> DataReport:
        """Prepare the data and return its :class:`lorakit.data.DataReport` (rows dropped per reason, token
        length percentiles, trained tokens per example, end-of-turn check, pad == EOS, double BOS).

        ``report.problems()`` lists fatal problems and warnings; ``train()`` stops on the fatal ones.
        """
        return self.prepare_data().report

    def _source(self) -> Any:
        """The data source as ``train()`` reads it (a streamed Hub dataset: the rows ``max_steps`` consumes)."""
        data = resolve_for_run(self, current_device()).data
        assert data is not None
        return data.source

    def _preference_data(self, tokenizer: Any, template: Any) -> PreparedData:
        """The preference rows tokenized exactly as ``train()`` would."""
        assert self.data is not None and self.preference is not None
        options = self.data.prepare_kwargs()
        return prepare_preference_data(
            self.data.source,
            tokenizer=tokenizer,
            template=template,
            paired=self.preference.info.paired,
            **{
                name: options[name]
                for name in ("max_length", "val_split", "seed", "val_source", "columns", "on_bad_row")
            },
        )

    def _tokenizer_and_template(self) -> tuple[Any, Any]:
        self.require()
        assert self.model is not None and self.data is not None
        return load_tokenizer(resolve_model_path(self.model), self.model), get_template(self.data.template)

    # --- configs ------------------------------------------------------------------------------------------

    def to_config(self, *, keep_secrets: bool = False) -> dict[str, Any]:
        """A JSON/YAML-able dict that :meth:`from_config` turns back into an equal pipeline.

        In-memory data (a list of dicts) is inlined; a ``datasets.Dataset`` is inlined as its rows.
        Secrets are masked (``***``, see :mod:`lorakit.tracking.secrets`): environment secrets, credentials
        in URLs (``https://user:pass@host``), secret-looking option values. The data rows and the template are
        kept as they are (they are what trains). ``keep_secrets=True`` keeps them too: only to hand the
        pipeline to another process of the same run, never to write a file someone else may read.
        """
        config = self._raw_config()
        if keep_secrets:
            return config
        data = config.get("data")
        kept = {}
        if data is not None:
            kept = {
                key: data[key]
                for key in ("template", "source", "val")
                if key == "template" or not isinstance(data[key], str)
            }
            data.update(dict.fromkeys(kept))  # redacted without them, then put back in their places
        config = redact(config)
        if kept:
            config["data"].update(kept)
        return config

    def _raw_config(self) -> dict[str, Any]:
        data = None
        if self.data is not None:
            data = attrs.asdict(self.data)
            source = self.data.source
            if not isinstance(source, (str, list)):
                source = source.to_list()  # datasets.Dataset
            data["source"] = str(source) if isinstance(source, str) else source  # a HubDataset as its id
            template = self.data.template
            data["template"] = template if isinstance(template, str) else get_template(template).to_dict()
        extra = {"distributed": attrs.asdict(self.distribution)} if self.distribution is not None else {}
        return {
            "lorakit_config": CONFIG_VERSION,
            "model": attrs.asdict(self.model) if self.model is not None else None,
            "method": self.method.to_dict() if self.method is not None else None,
            "quant": attrs.asdict(self.quant) if self.quant is not None else None,
            "data": data,
            "training": attrs.asdict(self.training),
            "tracking": {"backend": self.tracking.backend, **self.tracking.option_dict},
            **extra,
            **self._extras_config(),
        }

    def _extras_config(self) -> dict[str, Any]:
        """Config sections of the evaluation / samples / checkpoint / early-stopping specs that are set."""
        extras: dict[str, Any] = {}
        if self.evaluation is not None:
            extras["evaluation"] = {
                **attrs.asdict(self.evaluation),
                "metrics": [metric_name(m) for m in self.evaluation.metrics],
            }
        if self.samples is not None:
            extras["samples"] = {**attrs.asdict(self.samples), "prompts": list(self.samples.prompts)}
        for name in ("checkpoints", "early_stop"):
            spec = getattr(self, name)
            if spec is not None:
                extras[name] = attrs.asdict(spec)
        for name in ("preference", "start"):
            spec = getattr(self, name)
            if spec is not None:
                extras[name] = spec.to_dict()
        return extras

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | Path,
        *,
        trust_remote_code: bool = False,
        trust_template_classes: bool = False,
    ) -> Pipeline:
        """Rebuild a pipeline from :meth:`to_config` output, a YAML / JSON file, or a run directory.

        Reading a config runs no code by surprise (issue 21): a model section with ``trust_remote_code: true``
        is refused unless ``trust_remote_code=True`` (loading that model would run Python files shipped with
        it), and a data template naming an unregistered ``"class"`` unless ``trust_template_classes=True``
        (see :func:`lorakit.templates.template_from_dict`). Both checks run before anything is imported.

        A ``start:`` run (``start: runs/sft``) without a ``model:`` section is :meth:`from_run` of that run: its
        base model, quantization, adapter method and template complete the config.

        Raises:
            ConfigError: an invalid config, or one that needs an opt-in the caller did not give.
        """
        source = "The pipeline config dict"
        if isinstance(config, (str, Path)):
            source = f"Pipeline config {config_file_path(config)}"
            config = read_config_file(config)
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"from_config() takes a dict, a .yaml / .json path or a run directory, got {type(config).__name__}."
            )
        check_remote_code(config, source=source, trust_remote_code=trust_remote_code)
        if isinstance(config.get("start"), (str, Path)):  # `start: runs/sft` is short for {path: runs/sft}
            config = {**config, "start": {"path": str(config["start"])}}
        fields = _specs_from_config(config, trust_template_classes=trust_template_classes)
        if fields.get("start") is not None and fields["model"] is None:
            fields = cls._fields_from_start_run(
                fields,
                config,
                trust_remote_code=trust_remote_code,
                trust_template_classes=trust_template_classes,
            )
        try:
            pipeline = cls(**fields)
        except TypeError as error:
            raise ConfigError(f"Invalid pipeline config: {error}") from error
        if pipeline.method is not None:
            _check_grad_checkpointing(pipeline.method, pipeline.training, second="Pipeline config")
        _check_quantization(pipeline.method, pipeline.quant, final=True)
        return pipeline

    @classmethod
    def _fields_from_start_run(
        cls,
        fields: dict[str, Any],
        config: Mapping[str, Any],
        *,
        trust_remote_code: bool,
        trust_template_classes: bool,
    ) -> dict[str, Any]:
        """A config with a ``start:`` run and no ``model:`` section is :meth:`from_run` of that run: its base
        model, quantization, method (the adapter keeps training) and template (unless ``data.template`` is
        set) complete the config's other sections."""
        parent = cls.from_run(
            fields["start"].path,
            trust_remote_code=trust_remote_code,
            trust_template_classes=trust_template_classes,
        )
        assert parent.start is not None
        method = fields["method"]
        if method is not None and parent.start.adapter and method != parent.method:
            raise ConfigError(
                f"Pipeline config: method {method.describe()!r} with start: {parent.start.path}: that run's "
                f"adapter ({parent.resolved_method.describe()}) keeps training with its own settings. Remove the "
                "method section, or drop start: to train a new adapter."
            )
        data = fields["data"]
        if data is not None and "template" not in config["data"] and parent.start.template is not None:
            data = attrs.evolve(data, template=parent.start.template)
        return {
            **fields,
            "model": parent.model,
            "method": method if method is not None else parent.method,
            "quant": fields["quant"] if fields["quant"] is not None else parent.quant,
            "data": data,
            "start": parent.start,
        }

    def save_config(self, path: str | Path) -> Path:
        """Write :meth:`to_config` to a ``.yaml`` / ``.yml`` (YAML) or ``.json`` file; :meth:`from_config` reads it.

        In-memory data (a list of dicts or a Dataset) is written inline; prefer a file path for big data.
        """
        return write_config_file(path, self.to_config())

"""Multi-process training on an existing engine: accelerate (DDP, FSDP, DeepSpeed) under the Trainer.

lorakit adds no distributed code of its own. It

- checks a launch before anything loads (:func:`preflight`) and after the process group exists
  (:func:`check_launch`), refusing N unsynchronised copies of one run;
- lets only the main process write the run directory (:func:`is_main_process`, used by ``train()``);
- describes a GPU cluster set-up once (:class:`DistributedSpec`, ``Pipeline.distributed(...)``) and turns it into
  the ``accelerate launch`` config file and the ``TrainingArguments`` keywords (:func:`accelerate_config`,
  :func:`training_arguments`);
- starts N processes of a pipeline (:func:`launch`): ``torchrun`` with ``ACCELERATE_USE_CPU=1`` (DDP over gloo)
  on CPU machines, ``accelerate launch`` with the generated config on GPUs.

Example:
    >>> import lorakit as lk  # doctest: +SKIP
    >>> pipe = lk.Pipeline.from_model("smollm2-135m").with_dataset("data.jsonl")  # doctest: +SKIP
    >>> lorakit.distributed.launch(pipe, "runs/ddp", num_processes=2)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from lorakit.config import ModelSpec, QuantSpec, TrainSpec
from lorakit.configfile import check_remote_code, config_file_path
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.methods import LoraSpec, MethodSpec, method_from_dict
from lorakit.models import current_device, load_model_config
from lorakit.plan import decide_grad_checkpointing, decide_liger
from lorakit.rundir import CHECKPOINTS_DIR, list_checkpoints
from lorakit.templates import template_from_dict

if TYPE_CHECKING:
    from lorakit.pipeline import Pipeline

__all__ = [
    "STRATEGIES",
    "DistributedSpec",
    "accelerate_config",
    "check_launch",
    "is_main_process",
    "launch",
    "launch_command",
    "preflight",
    "training_arguments",
]

STRATEGIES = ("ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("full_shard", "shard_grad_op")
_LAUNCH_FIX = (
    "Start the processes with a launcher that joins them into one job: on CPU "
    "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N script.py` (or lorakit.distributed.launch), on GPUs "
    "`accelerate launch --multi_gpu --num_processes N script.py`."
)


def _positive(name: str) -> Any:
    def check(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"distributed(): `{name}` must be a positive integer, got {value!r}.")

    return check


@attrs.frozen
class DistributedSpec:
    """How a run is spread over processes and machines (GPU clusters; DDP also on CPU)."""

    strategy: str = attrs.field(default="ddp")
    """``"ddp"`` (every process holds the model), ``"fsdp"`` (shards it) or ``"deepspeed"`` (ZeRO)."""
    num_processes: int = attrs.field(default=2, validator=_positive("num_processes"))
    """Processes per machine (one per GPU)."""
    num_machines: int = attrs.field(default=1, validator=_positive("num_machines"))
    """Machines (nodes) in the job."""
    main_process_ip: str | None = attrs.field(default=None)
    """Address of machine rank 0; required with more than one machine."""
    main_process_port: int = attrs.field(default=29500, validator=_positive("main_process_port"))
    """Port of the rendezvous on machine rank 0."""
    zero_stage: int | None = attrs.field(default=None)
    """DeepSpeed ZeRO stage, 2 (shard optimizer state + gradients) or 3 (and parameters); default 2."""
    sharding: str = attrs.field(default="full_shard")
    """FSDP: ``"full_shard"`` (parameters re-sharded after forward, ZeRO-3-like) or ``"shard_grad_op"``."""
    cpu_offload: bool = attrs.field(default=False, converter=bool)
    """Offload parameters (FSDP) or optimizer state (DeepSpeed) to CPU memory."""

    @strategy.validator
    def _check_strategy(self, _attribute: attrs.Attribute, value: Any) -> None:
        if value not in STRATEGIES:
            raise ConfigError(
                f"distributed(): strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {value!r}."
            )

    @zero_stage.validator
    def _check_zero(self, _attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if self.strategy != "deepspeed":
            raise ConfigError(
                f"distributed({self.strategy!r}, zero_stage={value!r}): zero_stage is a DeepSpeed setting. "
                "Use distributed('deepspeed', zero_stage=2 or 3), or drop zero_stage."
            )
        if value not in (2, 3):
            raise ConfigError(f"distributed('deepspeed'): zero_stage must be 2 or 3, got {value!r}.")

    @sharding.validator
    def _check_sharding(self, _attribute: attrs.Attribute, value: Any) -> None:
        if value not in FSDP_SHARDING:
            raise ConfigError(
                f"distributed(): sharding must be one of {', '.join(map(repr, FSDP_SHARDING))}, got {value!r}."
            )
        if value != "full_shard" and self.strategy != "fsdp":
            raise ConfigError(
                f"distributed({self.strategy!r}, sharding={value!r}): sharding is an FSDP setting. "
                "Use distributed('fsdp', sharding=...)."
            )

    @main_process_ip.validator
    def _check_ip(self, _attribute: attrs.Attribute, value: Any) -> None:
        if self.num_machines > 1 and not value:
            raise ConfigError(
                f"distributed(num_machines={self.num_machines}) needs main_process_ip: the address of machine "
                "rank 0, which every machine must reach (e.g. main_process_ip='10.0.0.1')."
            )

    @property
    def world_size(self) -> int:
        """Processes over all machines."""
        return self.num_processes * self.num_machines

    @property
    def stage(self) -> int:
        """The ZeRO stage DeepSpeed runs with."""
        return self.zero_stage or 2


# --- checks -----------------------------------------------------------------------------------------------


def _env_int(name: str, default: int = 1) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def check_spec_against(pipeline: Pipeline, spec: DistributedSpec) -> None:
    """Cross-checks with the rest of the pipeline, raised when ``distributed()`` is called or a run starts."""
    _check_quant(pipeline.quant, spec)


def _check_quant(quant: QuantSpec | None, spec: DistributedSpec) -> None:
    if quant is not None and quant.bits == 8 and spec.strategy != "ddp":
        raise ConfigError(
            f"distributed({spec.strategy!r}) with quantize_8bit(): bitsandbytes int8 weights cannot be sharded. "
            "Use quantize_4bit() (QLoRA shards with FSDP and ZeRO-3) or distributed('ddp')."
        )


def preflight(pipeline: Pipeline, *, cuda: bool) -> None:
    """Checks of the launch environment before anything loads.

    Raises:
        ConfigError: FSDP / DeepSpeed requested on a machine without CUDA (the Trainer would silently run DDP),
            or ``WORLD_SIZE > 1`` without a rendezvous address (copies that would not talk to each other).
        MissingDependencyError: ``distributed("deepspeed")`` without deepspeed installed.
    """
    spec = pipeline.distribution
    if spec is not None:
        check_spec_against(pipeline, spec)
        if not cuda:
            _require_cuda(spec)
        if spec.strategy == "deepspeed":
            if find_spec("deepspeed") is None:
                raise MissingDependencyError(
                    "distributed('deepspeed') needs deepspeed: pip install deepspeed (on a CUDA machine)."
                )
    world = _env_int("WORLD_SIZE")
    if world > 1 and not os.environ.get("MASTER_ADDR"):
        raise ConfigError(
            f"WORLD_SIZE={world} is set but MASTER_ADDR is not: these processes cannot find each other and "
            f"would train {world} unsynchronised copies. {_LAUNCH_FIX}"
        )


def _require_cuda(spec: DistributedSpec) -> None:
    """FSDP and DeepSpeed through the Trainer need CUDA (on CPU they silently become plain DDP)."""
    if spec.strategy != "ddp":
        raise ConfigError(
            f"distributed({spec.strategy!r}) needs CUDA GPUs and none is available; through the Trainer on "
            "CPU it would silently become plain DDP. Use distributed('ddp') (gloo on CPU) or run on GPUs."
        )


def check_launch(args: Any = None) -> None:
    """After the ``TrainingArguments`` exist: with ``WORLD_SIZE > 1`` the processes must form one process group.

    A launcher that starts N processes without making them a group (torchrun on CPU without
    ``ACCELERATE_USE_CPU=1`` for a plain Trainer, a GPU script started N times) trains N unsynchronised copies
    that overwrite each other's output; this raises :class:`ConfigError` instead.
    """
    world = _env_int("WORLD_SIZE")
    if world <= 1:
        return
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if group else 1
    if args is not None and group:
        size = min(size, int(getattr(args, "world_size", size)))
    if size != world:
        raise ConfigError(
            f"WORLD_SIZE={world} but this process is not part of a {world}-process group (found "
            f"{'no process group' if not group else f'a group of {size}'}): the copies would train unsynchronised. "
            + _LAUNCH_FIX
        )


def is_main_process() -> bool:
    """True in single-process runs and on global rank 0 of a distributed one."""
    if _env_int("WORLD_SIZE") <= 1:
        return True
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


# --- config generation ------------------------------------------------------------------------------------


def _mixed_precision(pipeline: Pipeline) -> str:
    precision = pipeline.training.precision
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}.get(precision, "bf16")


def _layer_classes(pipeline: Pipeline) -> list[str]:
    """The blocks FSDP wraps one per unit: the model class's ``_no_split_modules`` (its decoder layer), read
    from the model config without loading weights."""
    from transformers import AutoModelForCausalLM

    assert pipeline.model is not None
    config = load_model_config(pipeline.model)
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return []
    return list(getattr(model_class, "_no_split_modules", None) or [])


_TRAINER_OPTIONS_OWNED = {
    "output_dir": "train(output_dir)",
    "use_cpu": "lorakit's device choice (the GPU when there is one)",
    "bf16": "with_training(precision=...)",
    "fp16": "with_training(precision=...)",
    "gradient_checkpointing": "with_training(grad_checkpointing=...)",
    "gradient_checkpointing_kwargs": "with_training(grad_checkpointing=...)",
    "num_train_epochs": "with_training(epochs=...)",
    "max_steps": "with_training(max_steps=...)",
    "learning_rate": "with_training(lr=...)",
    "per_device_train_batch_size": "with_training(batch_size=...)",
    "per_device_eval_batch_size": "with_training(batch_size=...)",
    "gradient_accumulation_steps": "with_training(grad_accum=...)",
    "lr_scheduler_type": "with_training(scheduler=...)",
    "optim": "with_training(optim=...)",
    "warmup_steps": "with_training(warmup_ratio=...)",
    "warmup_ratio": "with_training(warmup_ratio=...)",
    "weight_decay": "with_training(weight_decay=...)",
    "seed": "with_training(seed=...)",
    "data_seed": "with_training(seed=...)",
    "logging_steps": "with_training(logging_steps=...)",
    "eval_strategy": "with_training(eval_steps=...) / with_eval(every=...)",
    "eval_steps": "with_training(eval_steps=...) / with_eval(every=...)",
    "save_strategy": "with_training(save_steps=...) / with_checkpoints(...)",
    "save_steps": "with_training(save_steps=...) / with_checkpoints(...)",
    "save_total_limit": "with_checkpoints(...)",
    "metric_for_best_model": "with_checkpoints(best_metric=...)",
    "greater_is_better": "with_checkpoints(best_metric=...)",
    "load_best_model_at_end": "with_checkpoints(load_best=...)",
    "report_to": "track(...)",
    "max_length": "with_dataset(max_length=...)",
    "packing": "with_dataset(packing=True)",
    "padding_free": "with_training(padding_free=...)",
    "dataset_kwargs": "lorakit's data preparation",
    "remove_unused_columns": "lorakit's data preparation",
    "dataloader_num_workers": "lorakit's data loading (rows are tokenized in memory; workers stay 0)",
    "dataloader_pin_memory": "lorakit's device choice (pinned on a GPU)",
    "disable_tqdm": "the LORAKIT_PROGRESS environment variable",
    "group_by_length": "with_training(group_by_length=...)",
    "use_liger_kernel": "with_training(liger=...)",
    "fsdp": "distributed(strategy='fsdp')",
    "fsdp_config": "distributed(strategy='fsdp')",
    "deepspeed": "distributed(strategy='deepspeed')",
    "ddp_find_unused_parameters": "distributed(...)",
}
"""SFTConfig fields lorakit sets from its own settings: ``trainer_options`` naming one is refused."""


def check_trainer_options(options: Mapping[str, Any]) -> None:
    """``with_training(trainer_options=)``: every key a field of the installed TRL ``SFTConfig``, none that a
    lorakit setting owns (:data:`_TRAINER_OPTIONS_OWNED`).

    Raises:
        ConfigError: naming the key and close matches (difflib), or the lorakit setting to use instead.
    """
    import dataclasses
    import difflib

    from trl import SFTConfig

    fields = {field.name for field in dataclasses.fields(SFTConfig) if field.init}
    for key in options:
        if key in _TRAINER_OPTIONS_OWNED:
            raise ConfigError(
                f"with_training(trainer_options={{{key!r}: ...}}): lorakit sets {key!r} itself; use "
                f"{_TRAINER_OPTIONS_OWNED[key]} instead."
            )
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            raise ConfigError(
                f"with_training(trainer_options={{{key!r}: ...}}): {key!r} is not a field of TRL's SFTConfig "
                f"(trl {_version('trl')})"
                + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ".")
            )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _pass_through(pipeline: Pipeline) -> dict[str, Any]:
    """The ``SFTConfig`` keywords of the fast paths the plan chose (Liger kernels) and of ``trainer_options``."""
    liger, _ = decide_liger(pipeline.training.liger, current_device())
    extra: dict[str, Any] = {"use_liger_kernel": True} if liger else {}
    return {**extra, **pipeline.training.option_dict}


def training_arguments(
    pipeline: Pipeline, *, layer_classes: Sequence[str] | None = None, device: str = "cuda"
) -> dict[str, Any]:
    """The ``TrainingArguments`` / ``SFTConfig`` keywords of the pipeline's distributed set-up.

    DDP adds nothing but ``ddp_find_unused_parameters=False`` (frozen base weights get no gradient, and
    searching for them every step costs time). FSDP returns ``fsdp`` and an FSDP2 ``fsdp_config`` wrapping one
    decoder layer per unit; with QLoRA the weights load straight to their shards
    (``cpu_ram_efficient_loading``). DeepSpeed returns a ZeRO-2/3 ``deepspeed`` dict whose batch and precision
    fields are ``"auto"`` (filled from the TrainingArguments). Gradient checkpointing follows
    :func:`lorakit.plan.decide_grad_checkpointing` on ``device`` (FSDP and DeepSpeed run on CUDA).
    """
    spec = pipeline.distribution
    if spec is None:
        return {"ddp_find_unused_parameters": False, **_pass_through(pipeline)}
    check_spec_against(pipeline, spec)
    grad_ckpt = decide_grad_checkpointing(pipeline.training, pipeline.resolved_method, device, spec)
    kwargs: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if grad_ckpt.on and not grad_ckpt.by_fsdp:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if spec.strategy == "fsdp":
        classes = list(layer_classes) if layer_classes is not None else _layer_classes(pipeline)
        kwargs.update(fsdp=True, fsdp_config=_fsdp_config(spec, classes))
        if grad_ckpt.by_fsdp:
            # FSDP's own activation checkpointing, not the Trainer's (which costs an extra AllGather)
            kwargs["fsdp_config"]["activation_checkpointing"] = True
            kwargs["gradient_checkpointing"] = False
    elif spec.strategy == "deepspeed":
        kwargs["deepspeed"] = _deepspeed_config(spec)
    return {**kwargs, **_pass_through(pipeline)}


def _fsdp_config(spec: DistributedSpec, classes: list[str]) -> dict[str, Any]:
    fsdp_config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": spec.sharding == "full_shard",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_offload": spec.cpu_offload,
    }
    if classes:
        fsdp_config["transformer_layer_cls_to_wrap"] = classes
    return fsdp_config


def _deepspeed_config(spec: DistributedSpec) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": spec.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if spec.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if spec.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if spec.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


def quantization_storage(pipeline: Pipeline) -> str | None:
    """The dtype 4-bit weights must be stored in so FSDP / ZeRO-3 can shard them (the compute dtype), or None."""
    spec, quant = pipeline.distribution, pipeline.quant
    if spec is None or quant is None or quant.bits != 4:
        return None
    if spec.strategy == "fsdp" or (spec.strategy == "deepspeed" and spec.stage == 3):
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
            pipeline.training.precision, "bfloat16"
        )
    return None


def accelerate_config(
    pipeline: Pipeline, *, machine_rank: int = 0, layer_classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` contents (a dict; write it as YAML) for the pipeline's set-up."""
    spec = pipeline.distribution or DistributedSpec()
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": spec.world_size,
        "num_machines": spec.num_machines,
        "machine_rank": machine_rank,
        "main_training_function": "main",
        "mixed_precision": _mixed_precision(pipeline),
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "debug": False,
        "gpu_ids": "all",
    }
    if spec.num_machines > 1:
        config.update(main_process_ip=spec.main_process_ip, main_process_port=spec.main_process_port)
    arguments = training_arguments(pipeline, layer_classes=layer_classes) if pipeline.distribution else {}
    if spec.strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        fsdp = dict(arguments["fsdp_config"])
        fsdp["offload_params"] = fsdp.pop("cpu_offload")
        if "transformer_layer_cls_to_wrap" in fsdp:  # accelerate's file takes a comma-separated string
            fsdp["transformer_layer_cls_to_wrap"] = ",".join(fsdp["transformer_layer_cls_to_wrap"])
        config["fsdp_config"] = {f"fsdp_{key}": value for key, value in fsdp.items()}
    elif spec.strategy == "deepspeed":
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": spec.stage,
            "offload_optimizer_device": "cpu" if spec.cpu_offload else "none",
            "offload_param_device": "cpu" if spec.cpu_offload and spec.stage == 3 else "none",
            "zero3_init_flag": spec.stage == 3,
            "zero3_save_16bit_model": spec.stage == 3,
        }
    return config


# --- launching --------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(
    config_path: str | Path,
    output_dir: str | Path,
    *,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = 29500,
    accelerate_config_file: str | Path | None = None,
    cuda: bool | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    trust_template_classes: bool = False,
    max_restarts: int = 0,
) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that train ``config_path`` into ``output_dir`` on N processes.

    Without CUDA: ``torchrun`` (single machine: ``--standalone``, a free port) with ``ACCELERATE_USE_CPU=1``
    and one thread per process per core, i.e. DDP over gloo. With CUDA: ``accelerate launch`` with the given
    config file (or ``--multi_gpu``). ``trust_remote_code`` / ``trust_template_classes`` add the worker's
    ``--trust-remote-code`` / ``--trust-template-classes`` (the opt-ins of :meth:`Pipeline.from_config`).

    Several machines on CPU join through torchrun's c10d rendezvous at ``main_process_ip:main_process_port``
    (the rendezvous assigns the global ranks). ``max_restarts`` > 0 lets the launcher restart the whole group
    that many times when a worker dies; the restarted workers resume from the last complete checkpoint.
    """
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"`max_restarts` must be 0 or a positive integer, got {max_restarts!r}.")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"`num_processes` must be a positive integer, got {num_processes!r}.")
    if num_machines > 1 and not main_process_ip:
        raise ConfigError(
            f"num_machines={num_machines} needs main_process_ip (the address of machine rank 0)."
        )
    cuda = _cuda_available() if cuda is None else cuda
    target = ["-m", "lorakit.distributed", "run", str(config_path), str(output_dir)]
    for flag, on in (
        ("--overwrite", overwrite),
        ("--trust-remote-code", trust_remote_code),
        ("--trust-template-classes", trust_template_classes),
    ):
        if on:
            target.append(flag)
    if not cuda:
        machine = (num_machines, machine_rank, main_process_ip, main_process_port)
        command, env = _torchrun_command(num_processes, machine, max_restarts)
        return command + target, env
    env: dict[str, str] = {}
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config_file is not None:
        command += ["--config_file", str(accelerate_config_file), f"--machine_rank={machine_rank}"]
    else:
        command += ["--multi_gpu", f"--num_processes={num_processes * num_machines}"]
        if num_machines > 1:
            command += [
                f"--num_machines={num_machines}",
                f"--machine_rank={machine_rank}",
                f"--main_process_ip={main_process_ip}",
                f"--main_process_port={main_process_port}",
            ]
    if max_restarts:
        command.append(f"--max_restarts={max_restarts}")
    return command + target, env


def _torchrun_command(
    num_processes: int, machine: tuple[int, int, str | None, int], max_restarts: int
) -> tuple[list[str], dict[str, str]]:
    """``torchrun`` on CPU: DDP over gloo, one machine (``--standalone``) or several (c10d rendezvous)."""
    num_machines, machine_rank, main_process_ip, main_process_port = machine
    cores = os.cpu_count() or 1
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, cores // num_processes))}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}"]
    if num_machines == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={num_machines}",
            f"--node_rank={machine_rank}",
            f"--master_addr={main_process_ip}",
            f"--master_port={main_process_port}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={main_process_ip}:{main_process_port}",
            f"--rdzv-id=lorakit-{main_process_port}",
        ]
    if max_restarts:
        command.append(f"--max-restarts={max_restarts}")
        # torchrun shares one TCP store between the restarts of a group, without a per-attempt prefix: the
        # restarted gloo group read the dead attempt's addresses ("Connection refused"). A store per attempt.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return command, env


def launch(
    pipeline: Pipeline | str | Path | Mapping[str, Any],
    output_dir: str | Path,
    *,
    num_processes: int | None = None,
    machine_rank: int = 0,
    overwrite: bool = False,
    env: Mapping[str, str] | None = None,
    trust_remote_code: bool | None = None,
    trust_template_classes: bool | None = None,
    num_machines: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    max_restarts: int = 0,
) -> int:
    """Train a pipeline (or a saved config file) on several processes; returns the launcher's exit code.

    This is what ``lorakit train CONFIG --num-processes N`` runs. ``num_processes`` defaults to the pipeline's
    ``distributed(num_processes=...)`` (2 without one). Machines other than rank 0 of a multi-machine job run
    the same call with their ``machine_rank``. ``num_machines`` / ``main_process_ip`` / ``main_process_port``
    override the pipeline's ``distributed(...)`` values. ``max_restarts=N`` restarts the whole group up to N
    times when a process dies (torchrun elastic); the new processes resume from the last complete
    checkpoint (``with_checkpoints(every=...)``), or start the run again when there is none yet.

    A config (dict, file or run directory) is checked here as far as launching reads it (model, method,
    quantization, training and distributed sections); each process builds the whole pipeline from it.

    Each process reads the config with :meth:`Pipeline.from_config`, which refuses remote model code and
    unregistered template classes without an opt-in. A Pipeline object was built in this process, so what it
    holds is passed on as trusted (``--trust-remote-code`` when its model spec has ``trust_remote_code``,
    ``--trust-template-classes`` when its template is a class). A config is trusted only through the
    ``trust_remote_code=`` / ``trust_template_classes=`` arguments; one with ``trust_remote_code: true`` is
    refused here without them.
    """
    config, specs, trusted = _launch_config(pipeline, trust_remote_code, trust_template_classes)
    spec = specs.distribution
    processes = num_processes if num_processes is not None else (spec.num_processes if spec else 2)
    cuda = _cuda_available()
    if spec is not None:
        check_spec_against(specs, spec)
        if not cuda:
            _require_cuda(spec)
    with tempfile.TemporaryDirectory(prefix="lorakit-launch-") as scratch:
        config_path = Path(scratch) / "pipeline.json"
        config_path.write_text(json.dumps(config, ensure_ascii=False))
        accelerate_file = None
        if cuda and spec is not None:
            import yaml

            accelerate_file = Path(scratch) / "accelerate.yaml"
            accelerate_file.write_text(yaml.safe_dump(accelerate_config(specs, machine_rank=machine_rank)))
        command, extra_env = launch_command(
            config_path,
            output_dir,
            num_processes=processes,
            num_machines=num_machines or (spec.num_machines if spec else 1),
            machine_rank=machine_rank,
            main_process_ip=main_process_ip or (spec.main_process_ip if spec else None),
            main_process_port=main_process_port or (spec.main_process_port if spec else 29500),
            accelerate_config_file=accelerate_file,
            max_restarts=max_restarts,
            cuda=cuda,
            overwrite=overwrite,
            trust_remote_code=trusted[0],
            trust_template_classes=trusted[1],
        )
        full_env = {**os.environ, **extra_env, **(env or {})}
        return subprocess.run(command, env=full_env, check=False).returncode


def _launch_config(
    pipeline: Pipeline | str | Path | Mapping[str, Any],
    remote_code: bool | None,
    template_classes: bool | None,
) -> tuple[dict[str, Any], Any, tuple[bool, bool]]:
    """The config each process reads, the specs launching checks, and the opt-ins passed to the processes.

    A config is refused here, before any process starts, when it needs an opt-in it was not given.
    """
    if not isinstance(pipeline, (Mapping, str, Path)):  # a Pipeline: its config, rebuilt in each process
        config = pipeline.to_config(keep_secrets=True)  # for the workers of this run, in a private temp dir
        return config, pipeline, _pipeline_trust(pipeline, config, remote_code, template_classes)
    source = "The pipeline config dict"
    if not isinstance(pipeline, Mapping):
        source = f"Pipeline config {config_file_path(pipeline)}"
    config = dict(pipeline) if isinstance(pipeline, Mapping) else _read_config(Path(pipeline))
    check_remote_code(config, source=source, trust_remote_code=bool(remote_code))
    data = config.get("data")
    template = data.get("template") if isinstance(data, Mapping) else None
    if isinstance(template, Mapping) and not template_classes:
        template_from_dict(template)  # an unregistered class is refused without importing it
    return config, _LaunchSpecs.from_config(config), (bool(remote_code), bool(template_classes))


def _pipeline_trust(
    pipeline: Pipeline, config: Mapping[str, Any], remote_code: bool | None, template_classes: bool | None
) -> tuple[bool, bool]:
    """The opt-ins a Pipeline object built in this process passes to its workers (an explicit value wins)."""
    if remote_code is None:
        remote_code = pipeline.model is not None and pipeline.model.trust_remote_code
    if template_classes is None:
        template = (config.get("data") or {}).get("template")
        template_classes = isinstance(template, Mapping) and "class" in template
    return remote_code, template_classes


@attrs.frozen
class _LaunchSpecs:
    """The specs of a pipeline config that launching reads (the processes build the whole pipeline)."""

    model: ModelSpec | None
    method: MethodSpec | None
    quant: QuantSpec | None
    training: TrainSpec
    distribution: DistributedSpec | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _LaunchSpecs:
        try:
            return cls(
                model=ModelSpec(**config["model"]) if config.get("model") else None,
                method=method_from_dict(config["method"]) if config.get("method") else None,
                quant=QuantSpec(**config["quant"]) if config.get("quant") else None,
                training=TrainSpec(**(config.get("training") or {})),
                distribution=DistributedSpec(**config["distributed"]) if config.get("distributed") else None,
            )
        except TypeError as error:
            raise ConfigError(f"Invalid pipeline config: {error}") from error

    @property
    def resolved_method(self) -> MethodSpec:
        return self.method if self.method is not None else LoraSpec()


def _read_config(path: Path) -> dict[str, Any]:
    """The pipeline config of a config file or a run directory (its ``lorakit_run.json``)."""
    try:
        config = json.loads(config_file_path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"launch(): cannot read the pipeline config {path}: {error}") from error
    return config.get("pipeline", config)


def restart_mode(output_dir: Path, *, overwrite: bool) -> tuple[bool, bool]:
    """``(overwrite, resume)`` for ``train()`` in a launched process.

    On the first attempt, what the caller asked. After torchrun restarted the group (a process died;
    ``TORCHELASTIC_RESTART_COUNT`` > 0): resume from the last complete checkpoint of this run, or, when the
    dead attempt wrote none yet, replace what it left behind. Every process decides from the same files,
    before any of them writes.
    """
    restarts = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if restarts <= 0:
        return overwrite, False
    resume = bool(list_checkpoints(output_dir / CHECKPOINTS_DIR))
    if is_main_process():
        where = "the last complete checkpoint" if resume else "the start (no checkpoint yet)"
        print(f"lorakit: restart {restarts} of the process group; resuming from {where}", flush=True)
    return not resume, resume


def _main(builder: Any, argv: Sequence[str] | None = None) -> int:
    """``python -m lorakit.distributed run CONFIG OUTPUT [--overwrite] [--trust-remote-code]
    [--trust-template-classes]``: what each launched process runs (the flags are from_config's opt-ins).

    ``builder`` is :class:`lorakit.Pipeline` (passed in by the script block: this module sits below the builder).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lorakit.distributed")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a pipeline config (one process of a launched job)")
    run.add_argument("config")
    run.add_argument("output_dir")
    run.add_argument("--overwrite", action="store_true")
    run.add_argument("--trust-remote-code", action="store_true")
    run.add_argument("--trust-template-classes", action="store_true")
    args = parser.parse_args(argv)
    pipeline = builder.from_config(
        args.config,
        trust_remote_code=args.trust_remote_code,
        trust_template_classes=args.trust_template_classes,
    )
    overwrite, resume = restart_mode(Path(args.output_dir), overwrite=args.overwrite)
    result = pipeline.train(args.output_dir, overwrite=overwrite, resume=resume)
    if is_main_process():
        print(json.dumps(result.metrics), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Run as a script (``python -m``), this file is the module ``__main__``, a layer above the builder;
    # ``lorakit.distributed`` itself never imports it.
    from lorakit.pipeline import Pipeline

    sys.exit(_main(Pipeline))

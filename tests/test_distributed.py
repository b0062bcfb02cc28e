"""Multi-process training: DDP over gloo on 2 CPU processes, launch checks, and generated GPU configs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import yaml

import lorakit as lk
from lorakit.cli import main as cli_main
from lorakit.distributed import (
    DistributedSpec,
    accelerate_config,
    check_launch,
    launch_command,
    preflight,
    quantization_storage,
    training_arguments,
)
from lorakit.errors import ConfigError, MissingDependencyError

ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Say hello.", "output": "hello world"},
    {"instruction": "Route this ticket: I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket: my parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "output": "0 1 2"},
    {"instruction": "Name a colour.", "output": "brown"},
    {"instruction": "How are you?", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "output": "the lazy dog"},
]


def _pipeline(model_dir, batch_size):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj"))
        .with_dataset(ROWS, template="alpaca", val_split=0, max_length=64, cache=False)
        .with_training(
            max_steps=3,
            batch_size=batch_size,
            lr=5e-3,
            logging_steps=1,
            warmup_ratio=0.0,
            scheduler="constant",
        )
    )


# --- 2 processes, DDP over gloo ---------------------------------------------------------------------------

AUDIT = textwrap.dedent(
    """
    import os, sys
    _out, _log = os.environ["LORAKIT_TEST_OUT"], os.environ["LORAKIT_TEST_WRITES"]
    _rank = os.environ.get("RANK", "launcher")

    def _hook(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove") and args:
            path = str(args[0])
            mode, flags = (args[1], args[2]) if event == "open" and len(args) > 2 else (None, 0)
            writing = event != "open" or (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
            if writing and path.startswith(_out):
                with open(f"{_log}-{_rank}", "a") as handle:
                    handle.write(f"{event} {path}\\n")

    sys.addaudithook(_hook)
    """
)


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_ddp_two_cpu_processes_match_one_process_and_only_rank_0_writes(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    single = _pipeline(tiny_model_dir, batch_size=8).train(tmp_path / "single")

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    out = tmp_path / "ddp"
    env = {
        "PYTHONPATH": f"{hooks}:{':'.join(p for p in sys.path if p)}",
        "LORAKIT_TEST_OUT": str(out),
        "LORAKIT_TEST_WRITES": str(tmp_path / "writes"),
        "HF_HUB_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Global batch 8 = 2 processes x 4: every step sees all rows, as the single-process run does.
    # Through the command line: `lorakit train CONFIG --num-processes 2` -> lorakit.distributed.launch.
    config = _pipeline(tiny_model_dir, batch_size=4).save_config(tmp_path / "ddp.yaml")
    assert cli_main(["train", str(config), "--output", str(out), "--num-processes", "2"]) == 0
    assert "on 2 processes (train_loss" in capsys.readouterr().out

    writes = {p.name.rsplit("-", 1)[1]: p.read_text().splitlines() for p in tmp_path.glob("writes-*")}
    assert writes.get("0"), "rank 0 wrote nothing"
    assert "1" not in writes, f"rank 1 wrote to the run directory: {writes.get('1')}"
    # metrics.json is written aside and renamed into place (the audit event names the temporary file).
    assert any(line.startswith("os.rename") and ".metrics.json." in line for line in writes["0"])
    ddp_metrics = json.loads((out / "metrics.json").read_text())
    assert ddp_metrics["train_steps"] == 3
    assert ddp_metrics["train_tokens"] == single.metrics["train_tokens"]  # summed over both processes
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [entry["loss"] for entry in logged if "loss" in entry]
    single_losses = [
        json.loads(line)["loss"]
        for line in (single.output_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(ddp_losses) == 3  # logged once, not once per process
    assert ddp_losses == pytest.approx(single_losses, abs=1e-4)
    assert ddp_losses[-1] < ddp_losses[0]
    ddp_adapter, single_adapter = _adapter(out), _adapter(single.output_dir)
    assert ddp_adapter.keys() == single_adapter.keys()
    for name, value in single_adapter.items():
        torch.testing.assert_close(ddp_adapter[name], value, atol=1e-4, rtol=1e-3)
    assert any(value.abs().sum() > 0 for name, value in ddp_adapter.items() if "lora_B" in name)


PAIRS = [
    {
        "prompt": f"Route ticket {i}: my card was charged twice",
        "chosen": "Routed to billing, thanks.",
        "rejected": r,
    }
    for i, r in enumerate(["shipping.", "no.", "go away.", "returns."] * 2)
]


def _dpo_pipeline(model_dir, batch_size):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj"))
        .with_dataset(PAIRS, template="chatml", val_split=0, max_length=64, cache=False)
        .with_preference("dpo", beta=0.1)
        .with_training(
            max_steps=2,
            batch_size=batch_size,
            lr=5e-2,
            logging_steps=1,
            warmup_ratio=0.0,
            scheduler="constant",
        )
    )


def test_dpo_on_two_cpu_processes_matches_one_process(tiny_model_dir, tmp_path, monkeypatch):
    # Global batch 8 pairs = 2 processes x 4: the same pairs and the same mean loss per step as one process
    # with batch 8. The reference is the policy with its adapter disabled, inside the DDP-wrapped model.
    from lorakit.distributed import launch

    single = _dpo_pipeline(tiny_model_dir, batch_size=8).train(tmp_path / "single")
    for key, value in {"HF_HUB_OFFLINE": "1", "LORAKIT_PROGRESS": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", ":".join(p for p in sys.path if p))
    out = tmp_path / "ddp"
    assert launch(_dpo_pipeline(tiny_model_dir, batch_size=4), out, num_processes=2) == 0

    def logged(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    ddp_steps = [row for row in logged(out) if "rewards/margins" in row and "loss" in row]
    single_steps = [row for row in logged(single.output_dir) if "rewards/margins" in row and "loss" in row]
    assert [row["step"] for row in ddp_steps] == [1, 2]  # logged once, not once per process
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert [row[key] for row in ddp_steps] == pytest.approx([row[key] for row in single_steps], abs=1e-4)
    assert ddp_steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference, log(2)
    assert ddp_steps[1]["rewards/margins"] > 0
    ddp_adapter, single_adapter = _adapter(out), _adapter(single.output_dir)
    assert ddp_adapter.keys() == single_adapter.keys()
    for name, value in single_adapter.items():
        torch.testing.assert_close(ddp_adapter[name], value, atol=1e-4, rtol=1e-3)
    # One process with batch 4 would train other pairs per step (and differ above); the token count is summed.
    assert json.loads((out / "metrics.json").read_text())["train_tokens"] == single.metrics["train_tokens"]
    assert json.loads((out / "lorakit_run.json").read_text())["pipeline"]["preference"]["objective"] == "dpo"


def test_cli_num_processes_failures_are_lorakit_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lorakit.distributed

    config = _pipeline(tiny_model_dir, batch_size=4).save_config(tmp_path / "ddp.yaml")
    calls = []

    def failing_launch(pipeline, output_dir, **options):
        calls.append((pipeline.training.batch_size, str(output_dir), options))
        return 3

    monkeypatch.setattr(lorakit.distributed, "launch", failing_launch)
    out = str(tmp_path / "run")
    assert (
        cli_main(["train", str(config), "--output", out, "--num-processes", "2", "--set", "training.lr=1e-3"])
        == 2
    )
    options = {"num_processes": 2, "machine_rank": 0, "overwrite": False}
    # The CLI's opt-ins (--trust-remote-code / --trust-template-classes) reach the workers; none given here.
    assert calls == [(4, out, {**options, "trust_remote_code": False, "trust_template_classes": False})]
    assert "2-process training run exited with code 3" in capsys.readouterr().err
    assert cli_main(["train", str(config), "--output", out, "--num-processes", "0"]) == 2
    assert "--num-processes must be a positive number of processes, got 0" in capsys.readouterr().err
    assert len(calls) == 1  # refused before launching


# --- launch checks ----------------------------------------------------------------------------------------


def test_world_size_without_a_rendezvous_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(
        ConfigError, match="WORLD_SIZE=2 is set but MASTER_ADDR is not.*unsynchronised copies"
    ):
        _pipeline(tiny_model_dir, 4).train(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_copies_outside_a_process_group_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ConfigError, match="not part of a 2-process group \\(found no process group\\).*torchrun"
    ):
        check_launch()
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch()  # a single process is fine


def test_fsdp_and_deepspeed_are_refused_on_cpu(tiny_model_dir):
    for strategy in ("fsdp", "deepspeed"):
        pipe = _pipeline(tiny_model_dir, 4).distributed(strategy)
        with pytest.raises(ConfigError, match=f"distributed\\('{strategy}'\\) needs CUDA GPUs.*silently"):
            preflight(pipe, cuda=False)
    preflight(_pipeline(tiny_model_dir, 4).distributed("ddp"), cuda=False)


def test_deepspeed_needs_the_package(tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name)
    )
    with pytest.raises(MissingDependencyError, match="pip install deepspeed"):
        preflight(_pipeline(tiny_model_dir, 4).distributed("deepspeed"), cuda=True)


def test_launch_commands():
    command, env = launch_command("c.json", "out", num_processes=2, cuda=False)
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert command[5:] == ["-m", "lorakit.distributed", "run", "c.json", "out"]
    assert env["ACCELERATE_USE_CPU"] == "1"
    command, _ = launch_command(
        "c.json",
        "out",
        num_processes=4,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        cuda=False,
    )
    assert "--nnodes=2" in command and "--node_rank=1" in command and "--master_addr=10.0.0.1" in command
    command, env = launch_command(
        "c.json", "out", num_processes=8, accelerate_config_file="a.yaml", cuda=True
    )
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--config_file", "a.yaml", "--machine_rank=0"]
    assert env == {}
    with pytest.raises(ConfigError, match="`num_processes` must be a positive integer, got 0"):
        launch_command("c.json", "out", num_processes=0)


# --- the builder and generated configs --------------------------------------------------------------------


def test_distributed_builder_validates_and_round_trips():
    base = lk.Pipeline.from_model("smollm2-135m")
    pipe = base.distributed("deepspeed", num_processes=8, zero_stage=3, cpu_offload=True)
    assert pipe.distribution == DistributedSpec("deepspeed", num_processes=8, zero_stage=3, cpu_offload=True)
    assert lk.Pipeline.from_config(pipe.to_config()) == pipe
    assert "distributed" not in base.to_config()
    with pytest.raises(
        ConfigError, match="strategy must be one of 'ddp', 'fsdp', 'deepspeed', got 'horovod'"
    ):
        base.distributed("horovod")
    with pytest.raises(ConfigError, match="zero_stage is a DeepSpeed setting"):
        base.distributed("fsdp", zero_stage=3)
    with pytest.raises(ConfigError, match="zero_stage must be 2 or 3, got 1"):
        base.distributed("deepspeed", zero_stage=1)
    with pytest.raises(ConfigError, match="needs main_process_ip"):
        base.distributed("ddp", num_machines=2)
    with pytest.raises(ConfigError, match="`num_processes` must be a positive integer, got 0"):
        base.distributed("ddp", num_processes=0)
    with pytest.raises(ConfigError, match="int8 weights cannot be sharded"):
        base.quantize_8bit().distributed("fsdp")


def test_training_arguments_are_accepted_by_transformers(tmp_path):
    from transformers import TrainingArguments

    base = lk.Pipeline.from_model("smollm2-135m").quantize_4bit().with_training(precision="bf16")
    assert training_arguments(base) == {"ddp_find_unused_parameters": False}
    fsdp = training_arguments(base.distributed("fsdp"), layer_classes=["LlamaDecoderLayer"])
    assert fsdp["fsdp"] is True and fsdp["gradient_checkpointing"] is False
    assert fsdp["fsdp_config"] == {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_offload": False,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "activation_checkpointing": True,
    }
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **fsdp)
    plugin = args._process_fsdp_args()
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["reshard_after_forward"] is True and plugin["activation_checkpointing"] is True
    assert quantization_storage(base.distributed("fsdp")) == "bfloat16"  # 4-bit weights shard as bf16
    assert quantization_storage(base.distributed("ddp")) is None
    zero3 = training_arguments(base.distributed("deepspeed", zero_stage=3, cpu_offload=True))["deepspeed"]
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero3["train_micro_batch_size_per_gpu"] == "auto" and zero3["bf16"] == {"enabled": "auto"}
    zero2 = training_arguments(base.distributed("deepspeed"))["deepspeed"]
    assert zero2["zero_optimization"]["stage"] == 2 and "offload_param" not in zero2["zero_optimization"]
    assert quantization_storage(base.distributed("deepspeed")) is None


@pytest.mark.parametrize(
    ("strategy", "options", "flags"),
    [
        ("ddp", {}, ("multi_gpu",)),
        ("fsdp", {"sharding": "shard_grad_op"}, ("use_fsdp",)),
        ("deepspeed", {"zero_stage": 3}, ("use_deepspeed",)),
    ],
)
def test_accelerate_config_passes_accelerate_launch_validation(
    tiny_model_dir, tmp_path, strategy, options, flags
):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    pipe = (
        lk.Pipeline.from_model(tiny_model_dir)
        .quantize_4bit()
        .with_training(precision="bf16")
        .distributed(strategy, num_processes=4, num_machines=2, main_process_ip="10.0.0.1", **options)
    )
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(pipe, machine_rank=1)))
    args = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "lorakit.distributed", "run"]
    )
    _validate_launch_command(args)
    for flag in ("multi_gpu", "use_fsdp", "use_deepspeed"):
        assert getattr(args, flag) is (flag in flags)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (8, 2, 1)
    assert args.mixed_precision == "bf16" and args.main_process_ip == "10.0.0.1"
    if strategy == "fsdp":
        env = prepare_multi_gpu_env(args)
        assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "false"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
        assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    if strategy == "deepspeed":
        assert args.zero_stage == 3 and args.zero3_init_flag is True


def test_launch_takes_a_pipeline_a_config_or_a_file(tiny_model_dir, tmp_path, monkeypatch):
    import subprocess
    from pathlib import Path

    import lorakit.distributed as dist

    seen = {}

    def fake_run(command, env, check):
        seen["config"] = json.loads(Path(command[command.index("run") + 1]).read_text())
        seen["command"] = command
        if "--config_file" in command:
            seen["accelerate"] = yaml.safe_load(Path(command[command.index("--config_file") + 1]).read_text())
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(dist.subprocess, "run", fake_run)
    monkeypatch.setattr(dist, "_cuda_available", lambda: False)
    pipe = _pipeline(tiny_model_dir, 4).distributed("ddp", num_processes=3)
    path = pipe.save_config(tmp_path / "pipe.json")
    for source in (pipe, pipe.to_config(), path, str(path)):
        assert dist.launch(source, tmp_path / "out") == 0
        assert "--nproc_per_node=3" in seen["command"]
        assert seen["command"][-5:] == [
            "-m",
            "lorakit.distributed",
            "run",
            seen["command"][-2],
            str(tmp_path / "out"),
        ]
        assert lk.Pipeline.from_config(seen["config"]) == lk.Pipeline.from_config(pipe.to_config())
    fsdp = _pipeline(tiny_model_dir, 4).distributed("fsdp").to_config()
    with pytest.raises(ConfigError, match="distributed\\('fsdp'\\) needs CUDA GPUs"):
        dist.launch(fsdp, tmp_path / "out")
    int8 = lk.Pipeline.from_model(tiny_model_dir).quantize_8bit().distributed("ddp").to_config()
    int8["distributed"]["strategy"] = "deepspeed"
    with pytest.raises(ConfigError, match="int8 weights cannot be sharded"):
        dist.launch(int8, tmp_path / "out")
    with pytest.raises(ConfigError, match="Invalid pipeline config: .*bogus"):
        dist.launch({**pipe.to_config(), "training": {"bogus": 1}}, tmp_path / "out")
    # On GPUs the accelerate config is generated from the config's specs (no builder needed).
    monkeypatch.setattr(dist, "_cuda_available", lambda: True)
    assert dist.launch(fsdp, tmp_path / "out", machine_rank=0) == 0
    assert seen["accelerate"]["distributed_type"] == "FSDP"
    assert seen["accelerate"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert seen["accelerate"]["fsdp_config"]["fsdp_activation_checkpointing"] is True

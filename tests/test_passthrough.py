"""trainer_options / model_options: what lorakit does not wrap, checked against the installed TRL and
transformers, refused where a lorakit setting owns it, and reaching the trainer and the model."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

import lorakit as lk
from lorakit.distributed import training_arguments
from lorakit.errors import ConfigError
from lorakit.models import ModelSpec, load_base_model, torch_dtype

ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("hi", "yes", "no", "ok")]


def test_trainer_options_pass_through_to_the_sft_config_keywords(tiny_model_dir):
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_dataset(ROWS, template="alpaca")
        .with_training(trainer_options={"max_grad_norm": 0.3, "neftune_noise_alpha": 5.0})
    )
    assert pipeline.training.option_dict == {"max_grad_norm": 0.3, "neftune_noise_alpha": 5.0}
    kwargs = training_arguments(pipeline)
    assert (kwargs["max_grad_norm"], kwargs["neftune_noise_alpha"]) == (0.3, 5.0)
    # Another with_training() call keeps them unless it passes new ones.
    assert pipeline.with_training(lr=1e-4).training.option_dict == pipeline.training.option_dict
    assert pipeline.with_training(trainer_options=None).training.options == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"max_grad_nrom": 1.0},
            r"'max_grad_nrom' is not a field of TRL's SFTConfig .*did you mean 'max_grad_norm'",
        ),
        ({"neftune_alpha": 5}, r"did you mean 'neftune_noise_alpha'"),
        (
            {"learning_rate": 1e-4},
            r"lorakit sets 'learning_rate' itself; use with_training\(lr=...\) instead",
        ),
        ({"bf16": True}, r"lorakit sets 'bf16' itself; use with_training\(precision=...\)"),
        ({"report_to": "wandb"}, r"use track\(...\) instead"),
        ({"packing": True}, r"use with_dataset\(packing=True\) instead"),
        ({"use_liger_kernel": True}, r"use with_training\(liger=...\) instead"),
    ],
)
def test_bad_trainer_options_are_refused_at_the_call(options, message):
    with pytest.raises(ConfigError, match=message):
        lk.Pipeline.from_model("m").with_training(trainer_options=options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"torch_dtype": "float16"}, r"lorakit sets 'torch_dtype' itself; use from_model\(dtype=...\)"),
        ({"device_map": "auto"}, r"lorakit sets 'device_map' itself"),
        ({"quantization_config": {}}, r"use quantize_4bit\(\) / quantize_8bit\(\)"),
        ({"attn_implementation": "eager"}, r"use from_model\(attention=...\)"),
    ],
)
def test_model_options_lorakit_owns_are_refused_at_the_call(options, message):
    with pytest.raises(ConfigError, match=message):
        lk.Pipeline.from_model("m", model_options=options)


def test_unknown_model_options_name_close_matches_once_the_config_is_read(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir, model_options={"use_cach": False}).with_dataset(ROWS)
    with pytest.raises(
        ConfigError, match=r"'use_cach' is neither a keyword argument .*did you mean 'use_cache'"
    ):
        pipeline.plan()
    with pytest.raises(ConfigError, match=r"did you mean 'max_memory'"):
        load_base_model(
            tiny_model_dir, ModelSpec(tiny_model_dir, options={"max_memroy": {}}), dtype=torch_dtype("fp32")
        )


def test_model_options_reach_from_pretrained(tiny_model_dir):
    spec = ModelSpec(tiny_model_dir, options={"use_cache": False, "rms_norm_eps": 1e-3})
    model = load_base_model(tiny_model_dir, spec, dtype=torch_dtype("fp32"))
    assert model.config.use_cache is False and model.config.rms_norm_eps == 1e-3
    default = load_base_model(tiny_model_dir, ModelSpec(tiny_model_dir), dtype=torch_dtype("fp32"))
    assert default.config.use_cache is True and default.config.rms_norm_eps == 1e-6


def test_options_survive_a_config_round_trip(tiny_model_dir):
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir, attention="eager", model_options={"use_cache": False})
        .with_dataset(ROWS, template="alpaca")
        .with_training(trainer_options={"max_grad_norm": 0.5}, liger=False)
    )
    again = lk.Pipeline.from_config(pipeline.to_config())
    assert again == pipeline
    assert again.model.option_dict == {"use_cache": False} and again.training.liger is False


class _SeenArgs(TrainerCallback):
    def __init__(self) -> None:
        self.args = None
        self.attention = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.args = args
        self.attention = model.config._attn_implementation


def test_a_run_trains_with_the_passed_options(tiny_model_dir, tmp_path):
    seen = _SeenArgs()
    result = (
        lk.Pipeline.from_model(tiny_model_dir, attention="eager")
        .with_lora(r=4)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=64)
        .with_training(
            max_steps=2,
            batch_size=2,
            optim="auto",
            trainer_options={"max_grad_norm": 0.25, "neftune_noise_alpha": 3.0},
        )
        .train(tmp_path / "run", callbacks=[seen])
    )
    assert (seen.args.max_grad_norm, seen.args.neftune_noise_alpha) == (0.25, 3.0)
    assert seen.args.optim == "adamw_torch_fused"  # optim="auto" on the CPU
    assert seen.attention == "eager"
    assert result.metrics["train_loss"] > 0

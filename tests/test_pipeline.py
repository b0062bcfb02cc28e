"""The builder: immutability, validation at the call, conflicts, configs, and the plan."""

from __future__ import annotations

import json
import subprocess
import sys

import attrs
import pytest

import lorakit as lk
from lorakit.errors import ConfigError, LorakitError

ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(20)]


def test_import_lorakit_is_light():
    code = (
        "import sys, lorakit; p = lorakit.Pipeline.from_model('x').with_lora(r=4); "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api():
    assert set(lk.__all__) == {
        "ConfigError",
        "DataError",
        "InferenceModel",
        "LorakitError",
        "MissingDependencyError",
        "Pipeline",
        "TrainResult",
        "__version__",
        "evaluate",
        "preference_sample_path",
    }
    assert issubclass(lk.ConfigError, ValueError) and issubclass(lk.ConfigError, LorakitError)
    assert issubclass(lk.MissingDependencyError, ImportError)


def test_builder_is_immutable():
    p1 = lk.Pipeline.from_model("some/model")
    p2 = p1.with_lora(r=8)
    p3 = p2.with_training(lr=1e-4)
    assert p1.method is None and p2.method.r == 8
    assert p2.training.lr == 2e-4 and p3.training.lr == 1e-4
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p3.model = None  # type: ignore[misc]


def test_with_training_keeps_earlier_values():
    p = lk.Pipeline.from_model("m").with_training(epochs=1, batch_size=2).with_training(lr=1e-3)
    assert (p.training.epochs, p.training.batch_size, p.training.lr) == (1, 2, 1e-3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p.with_lora(r=0), r"`r` must be a positive integer, got 0"),
        (lambda p: p.with_lora(alpha=-1), r"`alpha` must be a number in \(0"),
        (lambda p: p.with_lora(dropout=1.5), r"`dropout` must be a number in \[0.0, 1.0\), got 1.5"),
        (lambda p: p.with_lora(targets="q_proj"), r"For one module write targets=\('q_proj',\)"),
        (lambda p: p.with_lora(targets=()), r"non-empty tuple of module names"),
        (lambda p: p.with_lora(bias="some"), r"`bias` must be one of 'none', 'all', 'lora_only'"),
        (lambda p: p.quantize_4bit(quant_type="int4"), r"`quant_type` must be one of 'nf4', 'fp4'"),
        (lambda p: p.with_training(lr=0), r"`lr` must be a number in \(0"),
        (lambda p: p.with_training(batch_size=0), r"`batch_size` must be a positive integer, got 0"),
        (lambda p: p.with_training(scheduler="cosine_annealing"), r"`scheduler` must be one of 'linear'"),
        (
            lambda p: p.with_training(precision="fp8"),
            r"`precision` must be one of 'auto', 'fp32', 'bf16', 'fp16'",
        ),
        (lambda p: p.with_training(max_steps=-5), r"`max_steps` must be a positive integer, got -5"),
        (
            lambda p: p.with_dataset(ROWS, val_split=1.0),
            r"`val_split` must be a number in \[0.0, 1.0\), got 1.0",
        ),
        (lambda p: p.with_dataset(ROWS, max_length=8), r"`max_length` must be at least 16, got 8"),
        (lambda p: p.with_dataset("no/such/file.jsonl"), r"no such file"),
        (lambda p: p.with_dataset([1, 2]), r"must be a list of dicts"),
        (lambda p: p.with_dataset(ROWS, template="nope"), r"nope"),
        (lambda p: p.track("mlfow"), r"`backend` must be one of 'none', 'wandb', 'tensorboard', 'mlflow'"),
        (lambda p: p.track("wandb", api_key="abc"), r"looks like a secret"),
    ],
)
def test_validation_errors_name_field_and_value(call, match):
    with pytest.raises(ConfigError, match=match):
        call(lk.Pipeline.from_model("some/model"))


def test_quantization_conflict_names_both_calls():
    with pytest.raises(ConfigError, match=r"quantize_4bit\(\) conflicts with the earlier quantize_8bit\(\)"):
        lk.Pipeline.from_model("m").quantize_8bit().quantize_4bit()
    with pytest.raises(ConfigError, match=r"quantize_8bit\(\) conflicts with the earlier quantize_4bit\(\)"):
        lk.Pipeline.from_model("m").quantize_4bit().quantize_8bit()
    # Repeating the same call replaces it.
    assert (
        lk.Pipeline.from_model("m").quantize_4bit().quantize_4bit(quant_type="fp4").quant.quant_type == "fp4"
    )


def test_terminal_calls_need_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="No base model"):
        lk.Pipeline().explain()
    with pytest.raises(ConfigError, match="No training data"):
        lk.Pipeline.from_model("m").train(tmp_path / "run")


def test_config_round_trip(tmp_path):
    p = (
        lk.Pipeline.from_model("some/model", revision="main")
        .with_lora(r=8, alpha=16, targets=("q_proj", "v_proj"))
        .quantize_4bit(quant_type="fp4", double_quant=False)
        .with_dataset(ROWS, template="chatml", val_split=0.2, max_length=128, train_on_inputs=True)
        .with_training(epochs=2, lr=1e-4, batch_size=2, grad_accum=8, eval_steps=5)
        .track("tensorboard")
    )
    config = p.to_config()
    assert lk.Pipeline.from_config(config) == p
    path = tmp_path / "p.json"
    path.write_text(json.dumps(config))
    assert lk.Pipeline.from_config(path) == p


def test_from_config_rejects_unknown_sections():
    with pytest.raises(ConfigError, match="Unknown config sections: lora"):
        lk.Pipeline.from_config({"model": {"name_or_path": "m"}, "lora": {}})


def _lora_param_count(config, r):
    """LoRA adds r * (in + out) per targeted linear layer; all-linear targets every projection of a Llama."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + (h + i) + (h + i) + (i + h)
    return r * per_layer * config.num_hidden_layers


def test_explain_counts_parameters_without_loading_weights(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    p = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=8).with_dataset(ROWS, val_split=0.1)
    plan = p.with_training(batch_size=4, grad_accum=2, epochs=3).plan()
    assert plan.trainable_params == _lora_param_count(config, 8)
    assert plan.total_params == sum(t.numel() for t in _load_state(tiny_model_dir).values())
    assert plan.target_modules == (
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    )
    assert (plan.train_rows, plan.val_rows) == (18, 2)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)  # ceil(18 / 4) = 5 batches -> 3 steps of 2
    text = p.explain()
    assert "LoRA r=8" in text and f"{plan.trainable_params:,} trainable" in text


def test_explain_rejects_unknown_target_modules(tiny_model_dir):
    p = lk.Pipeline.from_model(tiny_model_dir).with_lora(targets=("c_attn",))
    with pytest.raises(ConfigError, match=r"matches no module.*Its linear modules are: .*q_proj"):
        p.explain()


def _load_state(model_dir):
    from safetensors.torch import load_file

    return load_file(f"{model_dir}/model.safetensors")

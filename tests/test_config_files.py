"""YAML / JSON pipeline configs: round trips, --set overrides, and the example configs shipped in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorakit as lk
from lorakit.configfile import apply_overrides, read_config_file
from lorakit.errors import ConfigError
from lorakit.quickstart import sample_path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROWS = [{"instruction": "Say hello.", "input": "", "output": "hello"}, {"prompt": "a", "completion": "b"}]


def _full_pipeline():
    return (
        lk.Pipeline.from_model("some/model", revision="main")
        .with_lora(r=8, alpha=16, targets=("q_proj", "v_proj"))
        .quantize_4bit(quant_type="fp4", double_quant=False)
        .with_dataset(
            ROWS,
            template="chatml",
            val_split=0.2,
            max_length=128,
            columns={"instruction": "question"},
            on_overflow="drop",
            packing=True,
        )
        .with_training(epochs=2, lr=1e-4, batch_size=2, grad_accum=8, eval_steps=5, precision="fp32")
        .track("wandb", project="p", tags=["x", "y"])
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_through_a_file(tmp_path, suffix):
    pipeline = _full_pipeline()
    path = pipeline.save_config(tmp_path / f"pipeline{suffix}")
    text = path.read_text()
    assert text.lstrip().startswith("{") == (suffix == ".json")
    assert lk.Pipeline.from_config(path) == pipeline
    assert lk.Pipeline.from_config(str(path)).to_config() == pipeline.to_config()


def test_yaml_reads_numbers_written_by_hand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name_or_path: m}\n"
        "data: {source: data.jsonl, template: alpaca}\n"
        "training: {lr: 2e-4, epochs: 1}\n"  # YAML 1.1 reads 2e-4 as a string; lorakit takes it
    )
    pipeline = lk.Pipeline.from_config(path)
    assert pipeline.training.lr == 2e-4 and pipeline.data.source == "data.jsonl"


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Cannot read pipeline config .*missing.yaml"):
        lk.Pipeline.from_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        lk.Pipeline.from_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml must hold a mapping of config sections .* got list"):
        lk.Pipeline.from_config(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: {name_or_path: m}\ntraining: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"`lr` must be a number in \(0, 1.0\], got -1"):
        lk.Pipeline.from_config(typo)


def test_overrides_set_nested_values_with_yaml_types():
    config = {"model": {"name_or_path": "m"}, "training": {"lr": 1e-3}}
    out = apply_overrides(
        config,
        [
            "training.lr=5e-5",
            "training.max_steps=7",
            "model=./other",
            "method.name=lora",
            "method.targets=[q_proj, v_proj]",
            "training.grad_checkpointing=true",
            "training.eval_steps=none",
        ],
    )
    assert out == {
        "model": {"name_or_path": "./other"},
        "training": {"lr": 5e-5, "max_steps": 7, "grad_checkpointing": True, "eval_steps": None},
        "method": {"name": "lora", "targets": ["q_proj", "v_proj"]},
    }
    assert config == {"model": {"name_or_path": "m"}, "training": {"lr": 1e-3}}  # not changed
    with pytest.raises(ConfigError, match=r"--set 'training.lr': expected section.field=value"):
        apply_overrides(config, ["training.lr"])


def test_overrides_keep_text_that_is_not_yaml_and_raise_other_errors(monkeypatch):
    out = apply_overrides({}, ["data.template=a: b: c", "note.date=2024-13-45", "note.tag=!!int 1.5"])
    assert out == {"data": {"template": "a: b: c"}, "note": {"date": "2024-13-45", "tag": "!!int 1.5"}}

    import yaml

    def broken(text):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(yaml, "safe_load", broken)
    with pytest.raises(RuntimeError, match="parser bug"):  # a bug is not mistaken for "not YAML"
        apply_overrides({}, ["training.lr=1e-4"])


def test_run_directory_config_is_read_from_its_run_file(tmp_path):
    from lorakit.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.write_run({"pipeline": {"model": {"name_or_path": "m"}}, "versions": {}})
    assert read_config_file(run.path) == {"model": {"name_or_path": "m"}}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"Cannot read pipeline config .*empty/lorakit_run\.json"):
        read_config_file(tmp_path / "empty")


# --- the shipped example configs ---------------------------------------------------------------------------
# The Hub is offline in tests, so each config's model is replaced by a tiny local model of the same
# architecture (built here from LlamaConfig / Qwen2Config / MistralConfig) and its data by the bundled sample;
# everything else (method, quantization, template, training) is validated as shipped.


def _tiny_model(tmp_path, arch):
    import transformers

    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[arch]
    config = getattr(transformers, config_class)(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # the shipped configs train at up to 2048 tokens
    )
    path = tmp_path / arch
    config.save_pretrained(path)
    return str(path)


SHIPPED = [
    ("llama_lora.yaml", "llama", "LlamaForCausalLM", "llama3"),
    ("qwen_qlora.yaml", "qwen2", "Qwen2ForCausalLM", "chatml"),
    ("mistral_ptuning.yaml", "mistral", "MistralForCausalLM", "mistral"),
]


@pytest.mark.parametrize(("name", "arch", "architecture", "template"), SHIPPED)
def test_shipped_config_explains_and_round_trips(tmp_path, name, arch, architecture, template):
    raw = read_config_file(CONFIGS / name)
    config = apply_overrides(
        raw, [f"model={_tiny_model(tmp_path, arch)}", f"data.source={sample_path('train')}"]
    )
    pipeline = lk.Pipeline.from_config(config)
    text = pipeline.explain()
    assert f"({architecture})" in text and f"template         {template}" in text
    assert "train / " in text and "optimizer steps" in text
    assert pipeline.method is not None and pipeline.method.name == raw["method"]["name"]
    if raw.get("quant"):
        assert "4-bit bitsandbytes (nf4, double quant on)" in text
    # The config round-trips: to_config of the pipeline it describes gives the same pipeline, in YAML too.
    assert lk.Pipeline.from_config(pipeline.to_config()) == pipeline
    assert lk.Pipeline.from_config(pipeline.save_config(tmp_path / "again.yaml")) == pipeline
    shipped = lk.Pipeline.from_config(CONFIGS / name)
    assert shipped.model.name_or_path == raw["model"]["name_or_path"]
    assert shipped.data.source == "data/train.jsonl"

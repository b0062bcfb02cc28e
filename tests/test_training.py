"""End-to-end runs on the tiny offline Llama: LoRA and 4-bit QLoRA through TRL, save, reload, merge."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError

# Eight short rows the tiny model can over-fit.
ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Route this ticket.", "input": "I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket.", "input": "My parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "How are you?", "input": "", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


class BaseWeightWatch:
    """A TrainerCallback that snapshots every frozen base weight at the start and compares at the end."""

    def __init__(self):
        from transformers import TrainerCallback

        watch = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                watch.before = {
                    n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n
                }
                watch.adapter_before = {
                    n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
                }

            def on_train_end(self, args, state, control, model=None, **kwargs):
                watch.after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
                watch.adapter_after = {
                    n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
                }

        self.callback = _CB()


def _pipeline(model_dir, **training):
    settings = dict(
        max_steps=30, lr=5e-3, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
    )
    settings.update(training)
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(**settings)
    )


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    watch = BaseWeightWatch()
    out = tmp_path_factory.mktemp("runs") / "lora"
    result = _pipeline(tiny_model_dir).train(out, callbacks=[watch.callback])
    return result, watch


def test_lora_changes_adapter_and_keeps_base(lora_run):
    _, watch = lora_run
    assert watch.before.keys() == watch.after.keys() and len(watch.before) > 0
    for name, before in watch.before.items():
        assert torch.equal(before, watch.after[name]), f"base weight {name} changed"
    assert len(watch.adapter_before) == 2 * 7 * 2  # lora_A + lora_B, 7 projections, 2 layers
    for name, before in watch.adapter_before.items():
        assert not torch.equal(before, watch.adapter_after[name]), f"adapter weight {name} did not train"


def test_loss_falls_when_overfitting(lora_run):
    result, _ = lora_run
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert result.metrics["train_steps"] == 30


def test_run_directory_contents(lora_run, tiny_model_dir):
    result, _ = lora_run
    out = result.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "lorakit_run.json",
        "metrics.json",
        "metrics.jsonl",
        "data/source.jsonl",
    ):
        assert (out / name).is_file(), name
    run = json.loads((out / "lorakit_run.json").read_text())
    assert run["template"]["name"] == "alpaca"
    assert run["data_report"]["train_rows"] == 8
    reloaded = lk.Pipeline.from_config(out)
    assert reloaded == _pipeline(tiny_model_dir).with_dataset(
        str(out / "data" / "source.jsonl"), template="alpaca", val_split=0.0, max_length=128
    )
    assert json.loads((out / "metrics.json").read_text()) == result.metrics


def test_refuses_to_overwrite_a_run(lora_run, tiny_model_dir):
    result, _ = lora_run
    with pytest.raises(ConfigError, match="the directory is not empty.*overwrite=True"):
        _pipeline(tiny_model_dir).train(result.output_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_adapter_reloads_in_plain_peft_with_equal_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = lora_run
    ours = lk.InferenceModel.load(result.output_dir)
    ids = ours.encode({"instruction": "Say hello.", "input": ""})
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.output_dir)
    plain.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.testing.assert_close(_logits(ours.model, ids), _logits(plain, ids))
    assert not torch.allclose(_logits(base, ids), _logits(plain, ids), atol=1e-3)  # the adapter matters


def test_generate_returns_only_the_learned_response(lora_run):
    result, _ = lora_run
    model = lk.InferenceModel.load(result.output_dir)
    assert model.generate("Say hello.", max_new_tokens=12) == "hello world"
    batch = model.generate(["What is the capital of France?", "Name a colour."], max_new_tokens=12)
    assert batch == ["Paris.", "brown"]


def test_merged_model_loads_in_plain_transformers(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    result, _ = lora_run
    adapter_model = lk.InferenceModel.load(result.output_dir)
    merged = adapter_model.merge()
    assert merged.is_merged and not adapter_model.is_merged
    with pytest.raises(ConfigError, match=r"Call \.merge\(\) first"):
        adapter_model.save(tmp_path / "nope")
    out = merged.save(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = adapter_model.encode({"instruction": "Name an animal.", "input": ""})
    torch.testing.assert_close(_logits(plain, ids), _logits(adapter_model.model, ids), atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert lk.InferenceModel.load(out).generate("Name an animal.", max_new_tokens=12) == "the lazy dog"


def test_pad_equal_to_eos_never_masks_eos(lora_run):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lorakit.data import encode
    from lorakit.templates import get_template

    result, _ = lora_run
    tok = lk.InferenceModel.load(result.output_dir).tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the tiny tokenizer has no pad: lorakit pads with EOS
    rows = [
        encode(
            [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello world"}],
            get_template("alpaca"),
            tok,
            max_length=128,
        ),
        encode(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "brown"}],
            get_template("alpaca"),
            tok,
            max_length=128,
        ),
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    )
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id  # the real EOS is trained
        assert (batch["labels"][i, n:] == -100).all()  # padding is not


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_trackers_write_locally_without_login(tiny_model_dir, tmp_path, monkeypatch, backend):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = _pipeline(tiny_model_dir, max_steps=3).track(
        backend, **({"project": "t"} if backend == "wandb" else {})
    )
    result = result.train(tmp_path / backend)
    if backend == "tensorboard":
        events = list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0
    else:
        runs = list((result.output_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (result.output_dir / "metrics.jsonl").read_text().count('"loss"') == 3


def test_warmup_ratio_sets_the_learning_rate_schedule(tiny_model_dir, tmp_path):
    # warmup_ratio=0.25 of 8 steps: 2 warm-up steps (transformers takes warmup_steps < 1 as a fraction), then a
    # linear decay to 0 after step 8. The learning rate logged at step k is the one step k trained with.
    result = _pipeline(tiny_model_dir, max_steps=8, lr=1e-2, warmup_ratio=0.25, scheduler="linear").train(
        tmp_path / "warmup"
    )
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [entry["learning_rate"] for entry in logged if "loss" in entry]
    expected = [0.0, 5e-3] + [1e-2 * (8 - k) / 6 for k in range(2, 8)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    # The whole warm-up is 2 steps: not 0 (a ratio read as int(0.25) steps) and not 0.25 * lr steps.
    assert rates[2] == pytest.approx(1e-2) and rates[1] == pytest.approx(5e-3)

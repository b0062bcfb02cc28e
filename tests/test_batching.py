"""Throughput metrics counted exactly, length-grouped batching, and its losses equal to unpacked training."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lorakit as lk
from lorakit.batching import GroupedSampler, grouped_indices, token_counts
from lorakit.data import IGNORE_INDEX
from lorakit.models import cpu_has_native_bf16

# Rows of very different lengths, so padding and grouping matter.
ROWS = [
    {
        "instruction": "Say " + "one two " * (i * 3 % 11 + 1),
        "output": "hello world " * (i * 5 % 7 + 1) + str(i),
    }
    for i in range(8)
]


def test_token_counts_of_padded_and_padding_free_batches():
    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8], [-100, 10, -100, -100]]),
    }
    assert token_counts(padded) == (6, 8, 3)
    flat = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[-100, 6, 7, -100, 9]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
    }
    assert token_counts(flat) == (5, 5, 3)  # the first label is never predicted: shifted away
    assert token_counts({"input_ids": torch.zeros((3, 2), dtype=torch.long)}) == (6, 6, 0)


def _padding_fraction(lengths, order, batch_size):
    computed = sum(
        max(lengths[i] for i in order[k : k + batch_size]) * len(order[k : k + batch_size])
        for k in range(0, len(order), batch_size)
    )
    return sum(lengths) / computed


def test_grouped_indices_is_a_seeded_permutation_of_similar_length_batches():
    rng = random.Random(0)
    lengths = [min(512, int(rng.lognormvariate(5, 0.8)) + 20) for _ in range(1000)]  # cut at max_length
    order = grouped_indices(lengths, 8, seed=3)
    assert sorted(order) == list(range(1000))
    assert order == grouped_indices(lengths, 8, seed=3)
    assert order != grouped_indices(lengths, 8, seed=4)
    assert max(lengths[i] for i in order[:8]) == max(lengths)  # the longest batch first
    assert _padding_fraction(lengths, order, 8) > 0.97
    shuffled = list(range(1000))
    random.Random(3).shuffle(shuffled)
    assert _padding_fraction(lengths, shuffled, 8) < 0.75
    # Batches come in random order, not sorted by length.
    firsts = [max(lengths[i] for i in order[k : k + 8]) for k in range(8, 1000, 8)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    sampler = GroupedSampler(lengths, 8, seed=3)
    assert list(sampler) == order and list(sampler) == grouped_indices(lengths, 8, seed=4)
    sampler.set_epoch(0)
    assert list(sampler) == order and len(sampler) == 1000


def _pipeline(model_dir, **options):
    training = {"batch_size": 8, "epochs": 2, "lr": 1e-3, "logging_steps": 1, "warmup_ratio": 0.0}
    data = {"template": "alpaca", "val_split": 0, "max_length": 128, "cache": False}
    for key in ("packing",):
        if key in options:
            data[key] = options.pop(key)
    training.update(options)
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj"))
        .with_dataset(ROWS, **data)
        .with_training(**training)
    )


def _logged_losses(result):
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One step per epoch holding every row: grouped (default), random order, and packed padding-free."""
    root = tmp_path_factory.mktemp("batching")
    return {
        name: _pipeline(tiny_model_dir, **options).train(root / name)
        for name, options in {
            "grouped": {},
            "random": {"group_by_length": False},
            "packed": {"packing": True},
        }.items()
    }


def test_metrics_count_the_tokens_of_the_data_exactly(runs, tiny_model_dir):
    prepared = _pipeline(tiny_model_dir).prepare_data().train
    lengths = [len(ids) for ids in prepared["input_ids"]]
    loss_tokens = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in prepared["labels"])
    assert len(lengths) == 8 and len(set(lengths)) > 4
    for name in ("grouped", "random"):
        metrics = runs[name].metrics
        assert metrics["train_steps"] == 2
        assert metrics["train_tokens"] == 2 * sum(lengths)
        assert metrics["train_computed_tokens"] == 2 * 8 * max(lengths)  # one batch of all rows per epoch
        assert metrics["train_loss_tokens"] == 2 * loss_tokens
        assert metrics["train_runtime"] > 0
        assert metrics["train_tokens_per_second"] == pytest.approx(
            metrics["train_tokens"] / metrics["train_runtime"], rel=1e-2
        )
    packed = runs["packed"].metrics
    assert packed["train_tokens"] == packed["train_computed_tokens"] == 2 * sum(lengths)  # padding-free
    # Packing masks each example's first label; alpaca's first token (BOS) never carries loss anyway.
    assert packed["train_loss_tokens"] == 2 * loss_tokens
    saved = json.loads((runs["grouped"].output_dir / "metrics.json").read_text())
    assert saved["train_tokens"] == 2 * sum(lengths)


def test_grouped_random_and_packed_batches_give_the_same_losses(runs):
    grouped = _logged_losses(runs["grouped"])
    assert len(grouped) == 2 and grouped[1] < grouped[0]
    assert _logged_losses(runs["random"]) == pytest.approx(grouped, abs=1e-5)
    assert _logged_losses(runs["packed"]) == pytest.approx(grouped, abs=1e-4)


def test_grouping_cuts_padding_in_training(tiny_model_dir, tmp_path):
    rows = [
        {"instruction": "Say " + "one " * (i * 7 % 23 + 1), "output": "hello " * (i * 11 % 29 + 1)}
        for i in range(48)
    ]
    metrics = {}
    for grouped in (True, False):
        result = (
            lk.Pipeline.from_model(tiny_model_dir)
            .with_lora(r=4, targets=("q_proj",))
            .with_dataset(rows, template="alpaca", val_split=0, max_length=256, cache=False)
            .with_training(epochs=1, batch_size=4, logging_steps=50, group_by_length=grouped)
            .train(tmp_path / str(grouped))
        )
        metrics[grouped] = result.metrics
    assert metrics[True]["train_tokens"] == metrics[False]["train_tokens"]  # every row once
    grouped_fraction = metrics[True]["train_tokens"] / metrics[True]["train_computed_tokens"]
    random_fraction = metrics[False]["train_tokens"] / metrics[False]["train_computed_tokens"]
    assert grouped_fraction > 0.95 > random_fraction


def test_group_by_length_is_validated():
    with pytest.raises(lk.ConfigError, match="`group_by_length` must be True or False, got 'yes'"):
        lk.Pipeline().with_training(group_by_length="yes")


@pytest.mark.skipif(
    torch.cuda.is_available() or not cpu_has_native_bf16(),
    reason="needs a CPU with native bf16 and no GPU",
)
def test_bf16_autocast_on_cpu_stays_close_to_fp32(runs, tiny_model_dir, tmp_path):
    result = _pipeline(tiny_model_dir, precision="bf16").train(tmp_path / "bf16")
    fp32 = _logged_losses(runs["grouped"])
    bf16 = _logged_losses(result)
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != pytest.approx(fp32, rel=1e-6)  # autocast did run in bf16
    assert json.loads((result.output_dir / "lorakit_run.json").read_text())["precision"] == "bf16"
    from safetensors.torch import load_file

    weights = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.float32}  # fp32 master weights


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch):
    from lorakit import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(lk.ConfigError, match=r"needs a CUDA GPU \(or, for bf16, a CPU with native bf16"):
        models.resolve_precision("bf16")
    with pytest.raises(lk.ConfigError, match=r"precision='fp16'\) needs a CUDA GPU and none is available"):
        models.resolve_precision("fp16")


@pytest.mark.skipif(
    torch.cuda.is_available() or not cpu_has_native_bf16(),
    reason="needs a CPU with native bf16 and no GPU",
)
def test_auto_precision_trains_a_wide_model_in_bf16_with_losses_close_to_fp32(wide_model_dir, tmp_path):
    # precision="auto" (the default) picks bf16 autocast on a native-bf16 CPU once the hidden size reaches
    # CPU_BF16_MIN_HIDDEN; the losses stay within 2% of an fp32 run on the same rows.
    wide = wide_model_dir
    assert lk.Pipeline.from_model(wide).with_dataset(ROWS, max_length=128).plan().precision == "bf16"
    auto = _pipeline(wide).train(tmp_path / "auto")
    fp32 = _pipeline(wide, precision="fp32").train(tmp_path / "fp32")
    assert json.loads((auto.output_dir / "lorakit_run.json").read_text())["precision"] == "bf16"
    assert json.loads((fp32.output_dir / "lorakit_run.json").read_text())["precision"] == "fp32"
    assert _logged_losses(auto) == pytest.approx(_logged_losses(fp32), rel=2e-2)
    assert _logged_losses(auto) != pytest.approx(_logged_losses(fp32), rel=1e-6)  # autocast did run in bf16

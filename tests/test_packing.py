"""Packing: exact packed rows, the padding-free collator, and packed loss == unpacked loss."""

from __future__ import annotations

from typing import Any

import pytest

from lorakit.collate import PadCollator, PaddingFreeCollator
from lorakit.data import IGNORE_INDEX, pack, prepare_data
from lorakit.data.prepare import first_fit_bins

ROWS = [
    {"instruction": "Say " + "one " * (i % 5 + 1), "output": "hello " * (i % 3 + 1) + str(i)}
    for i in range(12)
]


def test_pack_is_first_fit_decreasing_and_masks_each_first_label():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [-100, -100, 8, 9]), ([10], [10])]
    # Longest first: 4 tokens open bin 0, 3 open bin 1, 2 fill bin 1, 1 fills bin 0; members keep data order.
    assert pack(examples, max_length=5) == [
        {"input_ids": [6, 7, 8, 9, 10], "labels": [-100, -100, 8, 9, -100], "seq_lengths": [4, 1]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "seq_lengths": [3, 2]},
    ]
    assert pack(examples, max_length=4)[0] == {
        "input_ids": [6, 7, 8, 9],
        "labels": [-100, -100, 8, 9],
        "seq_lengths": [4],
    }


def _scan_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook first-fit decreasing (a scan over the open bins, O(n^2)): the oracle for the max-tree."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_bins_equals_the_scan_and_keeps_the_invariants(seed):
    import random

    rng = random.Random(seed)
    capacity = rng.choice([1, 7, 64, 512])
    lengths = [rng.randint(0, capacity) for _ in range(rng.randint(0, 400))]
    bins = first_fit_bins(lengths, capacity)
    assert bins == _scan_first_fit(lengths, capacity)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))  # each row once
    assert all(sum(lengths[i] for i in members) <= capacity for members in bins)
    examples = [(list(range(n)), [7] * n) for n in lengths]
    rows = pack(examples, capacity)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)  # same total tokens, nothing split
    assert [r["seq_lengths"] for r in rows] == [[lengths[i] for i in sorted(m)] for m in bins]


def test_first_fit_bins_gives_an_overlong_example_its_own_row():
    assert first_fit_bins([3, 9, 2, 3], capacity=5) == [[1], [0, 2], [3]]


def test_collators_only_pad_or_concatenate():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    padded = PadCollator(pad_token_id=0)(rows)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PadCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)["input_ids"].shape == (2, 4)
    packed = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "seq_lengths": [2, 1]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ]
    flat = PaddingFreeCollator(pad_token_id=0)(packed)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # Every example's first label is masked (7 starts the row's second example): nothing is predicted from
    # another example.
    assert flat["labels"].tolist() == [[-100, 6, -100, -100, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 0, 1]]
    assert "attention_mask" not in flat and flat["use_cache"] is False
    with pytest.raises(ValueError, match=r"seq_lengths \[2\] do not add up to the row's 3 tokens"):
        PaddingFreeCollator(pad_token_id=0)(
            [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lengths": [2]}]
        )


def test_prepare_data_packs_and_reports(tiny_tokenizer):
    plain = prepare_data(
        ROWS, tokenizer=tiny_tokenizer, template="alpaca", val_split=0.25, max_length=128, cache=False
    )
    packed = prepare_data(
        ROWS,
        tokenizer=tiny_tokenizer,
        template="alpaca",
        val_split=0.25,
        max_length=128,
        packing=True,
        cache=False,
    )
    assert packed.train.column_names == ["input_ids", "labels", "seq_lengths"]
    assert all(len(ids) <= 128 for ids in packed.train["input_ids"])
    assert sum(map(sum, packed.train["seq_lengths"])) == sum(map(len, plain.train["input_ids"]))
    assert len(packed.train) < len(plain.train) and packed.report.packed_sequences == len(packed.train)
    assert packed.report.packing_efficiency == round(
        packed.report.train_tokens / (len(packed.train) * 128), 4
    )
    trained = sorted(sum(label != IGNORE_INDEX for label in labels) for labels in packed.train["labels"])
    assert sum(trained) == plain.report.trained_tokens  # BOS is each example's first token: nothing lost
    assert "packed into" in packed.report.summary()


def _loss(model: Any, batch: dict[str, Any]) -> float:
    import torch

    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tiny_tokenizer, attn, train_on_inputs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=attn, dtype=torch.float32
    )
    model.eval()  # eval mode would build a KV cache; the collator's use_cache=False keeps examples apart
    options = {
        "template": "alpaca",
        "val_split": 0,
        "max_length": 256,
        "cache": False,
        "train_on_inputs": train_on_inputs,
    }
    plain = prepare_data(ROWS, tokenizer=tiny_tokenizer, **options)
    packed = prepare_data(ROWS, tokenizer=tiny_tokenizer, packing=True, **options)
    assert len(packed.train) < len(plain.train)
    unpacked_loss = _loss(model, PadCollator(tiny_tokenizer.pad_token_id or 0)(plain.train.to_list()))
    packed_loss = _loss(model, PaddingFreeCollator(0)(packed.train.to_list()))
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5)
    # Without per-example positions the same tokens attend across examples and the loss differs.
    leaky = PaddingFreeCollator(0)(packed.train.to_list())
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    assert abs(_loss(model, leaky) - unpacked_loss) > 1e-2


def test_train_with_packing(tiny_model_dir, tmp_path):
    import lorakit as lk

    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, targets=("q_proj", "v_proj"))
        .with_dataset(ROWS, template="alpaca", val_split=0.25, max_length=128, packing=True, cache=False)
        .with_training(max_steps=3, batch_size=2, lr=1e-3, logging_steps=1)
        .train(tmp_path / "run")
    )
    assert result.data_report["packing"] is True and result.data_report["packed_sequences"] >= 1
    assert result.metrics["train_steps"] == 3
    assert result.metrics["train_loss"] == pytest.approx(result.metrics["train_loss"])  # finite, not NaN
    assert result.metrics["eval_loss"] > 0

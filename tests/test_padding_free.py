"""Padding-free batches without packing (``with_training(padding_free=...)``): the decision, the collator's
concatenated batch against the padded one (logits and per-row losses, no cross-contamination), and training
with it against padded training (same losses, fp32)."""

from __future__ import annotations

from typing import Any

import pytest

import lorakit as lk
import lorakit.models
import lorakit.plan
from lorakit.collate import PadCollator, PaddingFreeCollator
from lorakit.data import IGNORE_INDEX, prepare_data
from lorakit.errors import ConfigError
from lorakit.models import DeviceInfo
from lorakit.plan import decide_padding_free
from lorakit.rundir import RunDir

ROWS = [
    {"instruction": "Say " + "one " * (i % 5 + 1), "output": "hello " * (i % 3 + 1) + str(i)}
    for i in range(12)
]
A100 = DeviceInfo(
    "cuda", "NVIDIA A100-SXM4-40GB", capability=(8, 0), total_memory=42_505_273_344, native_bf16=True
)


# --- the decision ---------------------------------------------------------------------------------------


def test_the_padding_free_decision():
    assert decide_padding_free("auto", packing=False, attention="flash_attention_2") == (
        True,
        "on (auto: flash_attention_2 runs the concatenated batch as variable-length sequences)",
    )
    assert decide_padding_free("auto", packing=False, attention=None) == (
        False,
        "off (auto: sdpa would need a block-diagonal mask over the concatenated batch; padded "
        "length-grouped batches cost less; padding_free=True forces it)",
    )
    assert decide_padding_free(True, packing=False, attention="eager") == (
        True,
        "on (padding_free=True: each batch is one row with per-example position_ids, block-diagonal mask)",
    )
    assert decide_padding_free(False, packing=False, attention="flash_attention_2")[0] is False
    assert decide_padding_free("auto", packing=True, attention=None) == (
        True,
        "on (packing=True: per-example position_ids, block-diagonal mask)",
    )
    with pytest.raises(ConfigError, match=r"padding_free=False\) contradicts with_dataset\(packing=True\)"):
        decide_padding_free(False, packing=True, attention=None)
    assert decide_padding_free("auto", packing=False, attention=None, preference=True) == (
        False,
        "off (preference objectives batch with TRL's collator)",
    )
    with pytest.raises(ConfigError, match=r"padding_free=True\): preference objectives .* TRL's collator"):
        decide_padding_free(True, packing=False, attention=None, preference=True)


def test_the_builder_option_is_validated_and_round_trips():
    with pytest.raises(ConfigError, match=r"`padding_free` must be True, False or \"auto\", got 'yes'"):
        lk.Pipeline.from_model("m").with_training(padding_free="yes")
    pipeline = lk.Pipeline.from_model("m").with_training(padding_free=True)
    assert pipeline.training.padding_free is True
    assert lk.Pipeline.from_config(pipeline.to_config()).training.padding_free is True
    assert lk.Pipeline.from_model("m").training.padding_free == "auto"


def test_explain_shows_the_choice(tiny_model_dir, monkeypatch):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, template="alpaca", max_length=64)
    lines = pipeline.explain().splitlines()
    assert any(line.startswith("  padding-free     off (auto: sdpa would need") for line in lines)
    forced = pipeline.with_training(padding_free=True).explain().splitlines()
    assert (
        "  padding-free     on (padding_free=True: each batch is one row with per-example position_ids, "
        "block-diagonal mask)"
    ) in forced
    # A GPU with flash-attention 2 installed: "auto" turns it on.
    monkeypatch.setattr(lorakit.plan, "current_device", lambda: A100)
    monkeypatch.setattr(lorakit.models, "flash_attention_installed", lambda: True)
    on_gpu = pipeline.explain().splitlines()
    assert (
        "  padding-free     on (auto: flash_attention_2 runs the concatenated batch as variable-length "
        "sequences)"
    ) in on_gpu


# --- the batch --------------------------------------------------------------------------------------------


def _row_losses(logits: Any, labels: Any) -> list[float]:
    """The mean next-token loss of each row of ``labels`` (shifted, -100 ignored)."""
    import torch

    losses = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        losses.append(
            float(
                torch.nn.functional.cross_entropy(
                    row_logits[:-1], row_labels[1:], ignore_index=IGNORE_INDEX, reduction="mean"
                )
            )
        )
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_padding_free_batch_computes_what_the_padded_batch_computes(tiny_model_dir, tiny_tokenizer, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=attn, dtype=torch.float32
    )
    model.eval()
    # train_on_inputs: every example's first label is a real token, which the collator must not let the
    # previous example predict.
    prepared = prepare_data(
        ROWS[:5],
        tokenizer=tiny_tokenizer,
        template="alpaca",
        val_split=0,
        max_length=256,
        cache=False,
        train_on_inputs=True,
    )
    rows = prepared.train.to_list()
    lengths = [len(row["input_ids"]) for row in rows]
    assert len(set(lengths)) > 1 and all(row["labels"][0] != IGNORE_INDEX for row in rows)
    padded = PadCollator(tiny_tokenizer.pad_token_id or 0)(rows)
    flat = PaddingFreeCollator(0)(rows)
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    with torch.no_grad():
        padded_out = model(**padded)
        flat_out = model(**flat)
    offsets = [sum(lengths[:i]) for i in range(len(rows))]
    flat_rows = [flat_out.logits[0, o : o + n] for o, n in zip(offsets, lengths, strict=True)]
    for i, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        torch.testing.assert_close(flat_rows[i], padded_out.logits[i, :n], atol=1e-5, rtol=1e-5)
        assert flat["position_ids"][0, o : o + n].tolist() == list(range(n))
    per_row_padded = _row_losses(
        [padded_out.logits[i, :n] for i, n in enumerate(lengths)],
        [padded["labels"][i, :n] for i, n in enumerate(lengths)],
    )
    per_row_flat = _row_losses(
        flat_rows, [flat["labels"][0, o : o + n] for o, n in zip(offsets, lengths, strict=True)]
    )
    assert per_row_flat == pytest.approx(per_row_padded, abs=1e-5)
    assert float(flat_out.loss) == pytest.approx(float(padded_out.loss), abs=1e-5)
    # The first label of every example after the first is masked; kept, the loss would change.
    assert [int(flat["labels"][0, o]) for o in offsets] == [IGNORE_INDEX] * len(rows)
    leaky = dict(flat)
    leaky["labels"] = torch.tensor([[label for row in rows for label in row["labels"]]])
    with torch.no_grad():
        assert abs(float(model(**leaky).loss) - float(padded_out.loss)) > 1e-3
    # Positions that do not restart let examples attend to each other: the logits change.
    crossed = dict(flat)
    crossed["position_ids"] = torch.arange(sum(lengths))[None]
    with torch.no_grad():
        assert (model(**crossed).logits[0, offsets[1]] - padded_out.logits[1, 0]).abs().max() > 1e-3


# --- training --------------------------------------------------------------------------------------------


def _train(tiny_model_dir: str, output: Any, padding_free: bool | str) -> tuple[dict[str, Any], Any]:
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj"))
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128, cache=False)
        .with_training(max_steps=3, batch_size=4, lr=1e-3, logging_steps=1, padding_free=padding_free)
        .train(output)
    )
    return result.metrics, RunDir(result.output_dir).read_run()


def test_training_padding_free_gives_the_padded_losses(tiny_model_dir, tmp_path):
    padded, padded_record = _train(tiny_model_dir, tmp_path / "padded", "auto")  # auto: off on the CPU
    free, free_record = _train(tiny_model_dir, tmp_path / "free", True)
    assert (padded_record["padding_free"], free_record["padding_free"]) == (False, True)
    # optim="auto" (the default): the record keeps "auto" in the config and says what it became.
    assert (free_record["pipeline"]["training"]["optim"], free_record["optimizer"]) == (
        "auto",
        "adamw_torch_fused",
    )
    assert (
        lk.Pipeline.from_config(free_record["pipeline"]).to_config()["training"]
        == (free_record["pipeline"]["training"])
    )
    assert free["train_loss"] == pytest.approx(padded["train_loss"], abs=1e-5)
    # Per step too: the same rows in the same length-grouped batches, each step's loss equal.
    steps = [
        [log["loss"] for log in RunDir(tmp_path / run).read_metrics_log() if "loss" in log]
        for run in ("padded", "free")
    ]
    assert len(steps[0]) == 3 and steps[1] == pytest.approx(steps[0], abs=1e-5)
    # The padding-free run computed no padding; the padded one did.
    assert free["train_computed_tokens"] == free["train_tokens"] == padded["train_tokens"]
    assert padded["train_computed_tokens"] > padded["train_tokens"]

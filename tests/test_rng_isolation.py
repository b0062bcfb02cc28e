"""Evaluation, evaluation metrics and generation samples during training never change what is trained: with LoRA
dropout on, a run with them saves a bit-identical adapter to the same run without them (fp32 and 4-bit)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.rng import forked_rng

ROWS = [
    {"instruction": f"Route ticket {i}.", "input": text, "output": queue}
    for i, (text, queue) in enumerate(
        [
            ("I was charged twice.", "billing"),
            ("My parcel never came.", "shipping"),
            ("The app crashes.", "technical"),
            ("Reset my password.", "account"),
        ]
        * 2
    )
]
VAL = [{"instruction": "Route this ticket.", "input": "Where is my order?", "output": "shipping"}] * 3


def _pipeline(model_dir, *, quantize, observed):
    pipeline = lk.Pipeline.from_model(model_dir).with_lora(r=4, alpha=8, dropout=0.05)
    if quantize:
        pipeline = pipeline.quantize_4bit()
    settings = dict(max_steps=6, lr=5e-3, batch_size=2, logging_steps=1, warmup_ratio=0.0, seed=3)
    if not observed:
        return pipeline.with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=96).with_training(
            **settings
        )
    return (
        pipeline.with_dataset(ROWS, template="alpaca", val=VAL, max_length=96)
        .with_training(**settings, eval_steps=2)
        .with_eval(["perplexity", "exact_match"], samples=2, max_new_tokens=3, batch_size=2)
        .log_samples(prompts=["Reset my password."], max_new_tokens=3, every=1)
    )


class _Draw:
    """A TrainerCallback that draws from every global RNG at each step end (as a careless callback would)."""

    def __init__(self):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import random

                import numpy as np

                torch.rand(100)
                np.random.rand(10)
                random.random()

        self.callback = _CB()


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "4bit"])
def test_evaluation_and_samples_do_not_change_the_trained_adapter(tiny_model_dir, tmp_path, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    observed = _pipeline(tiny_model_dir, quantize=quantize, observed=True).train(
        tmp_path / "observed", callbacks=[_Draw().callback]
    )
    plain = _pipeline(tiny_model_dir, quantize=quantize, observed=False).train(tmp_path / "plain")
    logged = (observed.output_dir / "metrics.jsonl").read_text()
    assert logged.count('"eval_loss"') >= 3 and '"eval_exact_match"' in logged  # evaluation really ran
    assert (observed.output_dir / "samples.jsonl").read_text().count('"generation"') >= 6  # samples too
    a = load_file(observed.output_dir / "adapter_model.safetensors")
    b = load_file(plain.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} adapter tensors differ, e.g. {different[:3]}"
    assert observed.metrics["train_loss"] == plain.metrics["train_loss"]


def test_forked_rng_restores_every_global_state():
    import random

    import numpy as np

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with forked_rng():
        torch.rand(50)
        np.random.rand(5)
        random.random()
    assert torch.equal(torch.rand(3), expected)

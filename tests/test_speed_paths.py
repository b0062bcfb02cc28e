"""Speed paths of the training step: the fused linear cross-entropy, the optimizer choice, compile=."""

from __future__ import annotations

import os
from typing import Any

import pytest

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.fused import fused_linear_cross_entropy

ROWS = [
    {"instruction": "Say " + "one " * (i % 5 + 1), "output": "hello " * (i % 3 + 1) + str(i)}
    for i in range(16)
]


def test_fused_cross_entropy_equals_the_unfused_loss_and_gradients():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (3, 40))
    labels[0, :12] = -100  # a prompt
    labels[2, 25:] = -100  # padding
    total, count = fused_linear_cross_entropy(hidden, weight, labels, chunk=7)  # chunks that do not divide
    logits = (hidden @ weight.t())[:, :-1]
    reference = F.cross_entropy(logits.reshape(-1, 300), labels[:, 1:].reshape(-1), reduction="sum")
    assert int(count) == int((labels[:, 1:] != -100).sum()) == 3 * 39 - 11 - 15
    assert float(total / count) == pytest.approx(float(reference / count), abs=1e-5)
    fused_grads = torch.autograd.grad(total / count, (hidden, weight))
    reference_grads = torch.autograd.grad(reference / count, (hidden, weight))
    for fused, ref in zip(fused_grads, reference_grads, strict=True):
        assert torch.allclose(fused, ref, atol=1e-6, rtol=1e-4)
    assert float(fused_grads[0][0, :11].abs().sum()) == 0.0  # positions without a label get no gradient


def test_fused_cross_entropy_of_a_batch_without_labels_is_a_connected_zero():
    import torch

    hidden = torch.randn(1, 4, 8, requires_grad=True)
    total, count = fused_linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((1, 4), -100))
    assert float(total) == 0.0 and int(count) == 0
    total.backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0


def _train(model_dir: str, tmp_path: Any, name: str, **training: Any) -> tuple[float, dict[str, Any], str]:
    from safetensors.torch import load_file

    result = (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
        .with_dataset(ROWS, template="alpaca", val_split=0, max_length=64, cache=False)
        .with_training(
            max_steps=3, batch_size=4, lr=1e-2, warmup_ratio=0.0, logging_steps=1, seed=0, **training
        )
        .train(tmp_path / name)
    )
    log = (tmp_path / name / "metrics.jsonl").read_text()
    return result.metrics["train_loss"], load_file(str(tmp_path / name / "adapter_model.safetensors")), log


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    return _train(
        tiny_model_dir, tmp_path_factory.mktemp("speed"), "base", fused_loss=False, optim="adamw_torch_fused"
    )


@pytest.mark.parametrize(
    "training",
    [{"fused_loss": True}, {"fused_loss": False, "optim": "adamw_torch"}],
    ids=["fused_loss", "optim_unfused"],
)
def test_speed_path_trains_like_the_baseline(tiny_model_dir, tmp_path, baseline, training):
    import torch

    loss, weights, log = _train(tiny_model_dir, tmp_path, "run", **training)
    base_loss, base_weights, base_log = baseline
    # TRL's loss logs the token accuracy it gets from its logits; the fused loss has no logits to log it from
    assert "mean_token_accuracy" in base_log
    assert ("mean_token_accuracy" in log) is not training["fused_loss"]
    assert loss == pytest.approx(base_loss, abs=1e-5)
    assert weights.keys() == base_weights.keys()
    for key, value in weights.items():
        assert torch.allclose(value, base_weights[key], atol=1e-5), key
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # it trained


@pytest.mark.skipif(
    os.environ.get("LORAKIT_TEST_COMPILE") != "1",
    reason="inductor compiles C++ kernels for minutes on 2 cores (over the CI budget); LORAKIT_TEST_COMPILE=1 runs it",
)
def test_compile_trains_like_the_baseline(tiny_model_dir, tmp_path, baseline):
    loss, _, _ = _train(tiny_model_dir, tmp_path, "compiled", fused_loss=False, compile=True)
    assert loss == pytest.approx(baseline[0], abs=1e-4)


def test_compile_and_fused_loss_are_validated_and_explained(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"`compile` must be True, False or \"auto\", got 'yes'"):
        lk.Pipeline.from_model(tiny_model_dir).with_training(compile="yes")
    with pytest.raises(ConfigError, match=r"`fused_loss` must be True or False, got 1"):
        lk.Pipeline.from_model(tiny_model_dir).with_training(fused_loss=1)
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=4).with_training(compile="auto")
    assert "compile off (compile='auto' on cpu)" in pipeline.explain()
    assert "optim adamw_torch_fused, fused linear cross-entropy" in pipeline.explain()

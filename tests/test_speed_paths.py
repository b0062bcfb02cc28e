"""Speed paths of the training step: the fused linear cross-entropy, the optimizer choice, compile=."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.fused import fused_linear_cross_entropy
from lorakit.models import cpu_has_native_bf16

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


# --- CPU: bool dropout masks, frozen weights in bf16 ------------------------------------------------------


def test_mask_dropout_drops_with_probability_p_and_scales_the_rest():
    import torch

    from lorakit.fused import MaskDropout

    dropout = MaskDropout(0.05).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 5 * (0.05 * 0.95 / 1e6) ** 0.5  # within 5 standard deviations
    # values are dropped independently: two halves of the mask both drop with p**2, and so do neighbours
    # (four neighbouring values share one 64-bit draw)
    low, high = (y == 0).flatten().chunk(2)
    both = float((low & high).float().mean())
    assert abs(both - 0.05**2) < 5 * (0.05**2 / 5e5) ** 0.5
    flat = (y == 0).flatten()
    for shift in (1, 2, 3):
        pairs = float((flat[:-shift] & flat[shift:]).float().mean())
        assert abs(pairs - 0.05**2) < 5 * (0.05**2 / 1e6) ** 0.5
    q = round(0.05 * 2**16) / 2**16  # the drop probability rounded to 16 bits: 0.0500031
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - q)))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / (1 - q))
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the seed reproduces the mask
    assert not torch.equal(dropout(x), y)
    assert dropout.eval()(x) is x and MaskDropout(0.0).train()(x) is x
    half = MaskDropout(0.05).train()(torch.ones(64, 64, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.equal(MaskDropout(1.0).train()(torch.ones(3, 5)), torch.zeros(3, 5))


def test_keep_mask_uses_all_16_bits_of_each_slice_and_any_shape():
    import torch

    from lorakit.fused import keep_mask

    torch.manual_seed(0)
    # p = 2**-16: a value is dropped only when all 16 bits of its slice are those of -32768; a constant low bit
    # would drop twice as many or none
    keep, q = keep_mask((4, 1 << 22), 2**-16)
    assert q == 2**-16 and keep.shape == (4, 1 << 22) and keep.dtype == torch.bool
    assert 256 - 5 * 16 < int((~keep).sum()) < 256 + 5 * 16
    # p = 0.5: the sign bit of each slice decides; all four slices of a draw are random (a 63-bit draw would
    # never drop the values of its top slice)
    dropped = (~keep_mask((1 << 20,), 0.5)[0]).view(-1, 4).float().mean(dim=0)
    assert torch.allclose(dropped, torch.full((4,), 0.5), atol=5 * (0.25 / (1 << 18)) ** 0.5)
    keep, q = keep_mask((3, 5, 7), 0.5)  # 105 values: not a multiple of the 4 slices of a draw
    assert keep.shape == (3, 5, 7) and q == 0.5
    assert keep_mask((10,), 0.3)[1] == round(0.3 * 65536) / 65536
    keep, q = keep_mask((10,), 1 - 2**-18)  # rounds to 1: everything dropped
    assert q == 1.0 and not keep.any()


def test_use_mask_dropout_swaps_every_lora_dropout_and_nothing_else(tiny_model_dir):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.fused import MaskDropout, use_mask_dropout

    for dropout, expected in ((0.05, 7 * 2), (0.0, 0)):  # 7 linear layers x 2 decoder layers
        spec = lk.Pipeline.from_model(tiny_model_dir).with_lora(dropout=dropout).resolved_method
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec.to_peft_config())
        before = sum(type(m) is torch.nn.Dropout for m in model.modules())
        assert use_mask_dropout(model) == expected
        assert sum(isinstance(m, MaskDropout) for m in model.modules()) == expected
        assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == before - expected


def test_frozen_weights_in_bf16_give_the_same_autocast_step_and_still_run_outside_autocast(tiny_model_dir):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.fused import store_frozen_bf16
    from lorakit.memory import frozen_linears

    spec = lk.Pipeline.from_model(tiny_model_dir).with_lora(dropout=0.0).resolved_method

    def model():
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec.to_peft_config())

    plain, stored = model(), model()
    for a, b in zip(plain.parameters(), stored.parameters(), strict=True):
        if b.requires_grad:  # B != 0, so the adapter takes part in the loss
            b.data.normal_(generator=torch.Generator().manual_seed(a.numel()))
            a.data.copy_(b.data)
    assert store_frozen_bf16(stored) == 7 * 2
    assert {m.weight.dtype for m in frozen_linears(stored)} == {torch.bfloat16}
    assert {p.dtype for p in stored.parameters() if p.requires_grad} == {torch.float32}
    assert (
        stored.get_base_model().lm_head.weight.dtype == torch.float32
    )  # the head is not a frozen linear here
    ids = torch.randint(0, stored.config.vocab_size, (2, 24))
    losses, grads = [], []
    for m in (plain, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    assert torch.equal(losses[0], losses[1])  # autocast multiplied the same bf16 operands
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    with torch.no_grad():  # outside autocast (e.g. generation during evaluation): bf16 matmuls, fp32 out
        fp32_logits = plain(input_ids=ids).logits
        logits = stored(input_ids=ids).logits
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, fp32_logits, atol=0.1) and not torch.equal(logits, fp32_logits)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_frozen_weights_in_bf16_release_the_mapped_weights_file(tiny_model_dir, tmp_path):
    import gc

    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.fused import store_frozen_bf16

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True  # the embedding stays fp32 and is the head too
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    weights = str(tmp_path / "model" / "model.safetensors")

    def mappings():
        return sum(weights in line for line in Path("/proc/self/maps").read_text().splitlines())

    spec = lk.Pipeline.from_model(tiny_model_dir).with_lora(dropout=0.0).resolved_method
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), spec.to_peft_config())
    assert mappings() > 0  # transformers maps the file: the weights are views of it
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert store_frozen_bf16(model) == 7 * 2
    gc.collect()
    assert mappings() == 0  # nothing refers to the file any more: its pages are not resident
    base = model.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # still tied
    for name, param in model.named_parameters():
        expected = before[name].to(param.dtype)  # the bf16 weights are their fp32 values rounded
        assert torch.equal(param, expected), name
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_plan_says_when_frozen_weights_are_stored_in_bf16(wide_model_dir, monkeypatch):
    import torch

    from lorakit import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = lk.Pipeline.from_model(wide_model_dir).with_dataset(ROWS, max_length=64)

    def step(pipeline):
        return pipeline.plan().speed

    assert "bool dropout masks, frozen weights in bf16" in step(base.with_lora())
    fp32 = base.with_lora().with_training(precision="fp32")
    assert "frozen weights in bf16" not in step(fp32)
    assert "bool dropout masks" in step(fp32)
    assert "frozen weights in bf16" not in step(base.with_lora(use_dora=True))
    assert "frozen weights in bf16" not in step(base.full_finetune())
    assert "bool dropout masks" not in step(base.with_lora(dropout=0.0))
    # the memory plan: the frozen linear weights at 2 bytes and no autocast copies of them
    on, off = base.with_lora().plan().memory, base.with_lora(use_dora=True).plan().memory
    assert on.weights < off.weights and on.activations < off.activations


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="needs a CPU with native bf16",
)
def test_a_bf16_run_with_frozen_bf16_weights_evaluates_with_generation_and_saves_fp32(
    wide_model_dir, tmp_path
):
    import json

    import torch
    from safetensors.torch import load_file

    pipeline = (
        lk.Pipeline.from_model(wide_model_dir)
        .with_lora(r=4, alpha=8)
        .with_dataset(ROWS, template="alpaca", val=ROWS[:2], max_length=64)
        .with_training(max_steps=3, batch_size=4, lr=1e-3)
        .with_eval(["exact_match"], max_new_tokens=4)  # generates outside autocast, through the hooks
    )
    assert "frozen weights in bf16" in pipeline.plan().speed
    from transformers import TrainerCallback

    from lorakit.fused import MaskDropout
    from lorakit.memory import frozen_linears

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["frozen"] = {m.weight.dtype for m in frozen_linears(model)}
            seen["masks"] = sum(isinstance(m, MaskDropout) for m in model.modules())

    result = pipeline.train(tmp_path / "run", callbacks=[Probe()])
    assert seen == {"frozen": {torch.bfloat16}, "masks": 7}
    assert json.loads((result.output_dir / "lorakit_run.json").read_text())["precision"] == "bf16"
    assert 0.0 <= result.metrics["eval_exact_match"] <= 1.0
    weights = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.float32}
    assert any(float(value.abs().sum()) > 0 for key, value in weights.items() if "lora_B" in key)  # trained
    reply = lk.InferenceModel.load(result.output_dir).generate("Say one", max_new_tokens=3)
    assert isinstance(reply, str)


def test_fused_loss_projects_128_positions_at_once_on_a_cpu_and_1024_elsewhere(monkeypatch):
    # On a CPU a chunk of 1024 positions' fp32 logits (200 MB for a 49k vocabulary) is a fresh mmap every time;
    # 128 positions stay under glibc's largest mmap threshold and reuse heap blocks.
    import torch

    import lorakit.fused
    from lorakit.memory import fused_chunk_tokens

    assert (fused_chunk_tokens("cpu"), fused_chunk_tokens("cuda"), fused_chunk_tokens("mps")) == (
        128,
        1024,
        1024,
    )
    chunks = []
    real_apply = lorakit.fused._LinearCrossEntropy.apply
    monkeypatch.setattr(
        lorakit.fused._LinearCrossEntropy,
        "apply",
        lambda hidden, weight, targets, chunk: (
            chunks.append(chunk) or real_apply(hidden, weight, targets, chunk)
        ),
    )
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (2, 300))
    total, count = fused_linear_cross_entropy(hidden, weight, labels)
    chunked, _ = fused_linear_cross_entropy(hidden, weight, labels, chunk=1024)
    assert chunks == [128, 1024] and int(count) == 598
    # a trained head (full fine-tuning) adds a vocabulary x hidden gradient per chunk: 1024 on a CPU too
    assert fused_chunk_tokens("cpu", head_trained=True) == 1024
    fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels)
    assert chunks == [128, 1024, 1024]
    reference = torch.nn.functional.cross_entropy(
        (hidden[:, :-1] @ weight.T).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked, total, rtol=1e-6, atol=1e-4)

"""4-bit QLoRA on the CPU (bitsandbytes runs nf4 there): trains, stays fp32, and evaluation never changes it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk

pytest.importorskip("bitsandbytes")

ROWS = [
    {"instruction": f"Route ticket {i}.", "input": text, "output": queue}
    for i, (text, queue) in enumerate(
        [
            ("I was charged twice.", "billing"),
            ("My parcel never came.", "shipping"),
            ("The app crashes.", "technical"),
            ("Reset my password.", "account"),
        ]
        * 5
    )
]


def _qlora(model_dir, **training):
    settings = dict(max_steps=4, lr=5e-3, batch_size=4, logging_steps=1, warmup_ratio=0.0)
    settings.update(training)
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .quantize_4bit()
        .with_dataset(ROWS, template="alpaca", val_split=0.2, max_length=128)
        .with_training(**settings)
    )


def test_qlora_trains_on_cpu_and_keeps_fp32_adapter(tiny_model_dir, tmp_path):
    result = _qlora(tiny_model_dir, max_steps=8).train(tmp_path / "q")
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())
    assert result.metrics["eval_loss"] > 0 and result.metrics["eval_perplexity"] > 1
    model = lk.InferenceModel.load(result.output_dir)
    assert (
        type(model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
        == "Linear4bit"
    )
    assert isinstance(model.generate("Reset my password.", max_new_tokens=4), str)


def test_mid_run_evaluation_does_not_change_qlora_training(tiny_model_dir, tmp_path):
    with_eval = _qlora(tiny_model_dir, eval_steps=1).train(tmp_path / "with-eval")
    without = _qlora(tiny_model_dir).train(tmp_path / "without-eval")  # evaluates only after the last step
    a = load_file(with_eval.output_dir / "adapter_model.safetensors")
    b = load_file(without.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_qlora_merge_reloads_base_unquantized(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _qlora(tiny_model_dir).train(tmp_path / "q")
    merged = lk.InferenceModel.load(result.output_dir).merge()
    assert not any("Linear4bit" in type(m).__name__ for m in merged.model.modules())
    # Merging into the fp32 base equals the adapter applied on the fp32 base.
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.output_dir
    )
    ids = merged.encode("Reset my password.")
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(input_ids=torch.tensor([ids])).logits,
            reference.eval()(input_ids=torch.tensor([ids])).logits,
            atol=1e-4,
            rtol=1e-4,
        )


def test_8bit_path_trains_on_cpu(tiny_model_dir, tmp_path):
    pipeline = _qlora(tiny_model_dir, max_steps=3)
    pipeline = lk.Pipeline.from_config({**pipeline.to_config(), "quant": None}).quantize_8bit()
    result = pipeline.train(tmp_path / "int8")
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())
    model = lk.InferenceModel.load(result.output_dir)
    assert (
        type(model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
        == "Linear8bitLt"
    )

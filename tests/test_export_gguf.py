"""GGUF export round trip: transformers loads the file back with the merged model's logits (f32 to 1e-4, f16
to its rounding, q8_0 loosely), the stored chat template renders the training prompt, and the Modelfile."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.export import modelfile, ollama_pieces
from lorakit.templates import get_template

pytest.importorskip("gguf")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A random LoRA adapter (non-zero B) on the tiny Llama: merging changes every targeted matrix."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("gguf-adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(adapter_dir):
    return lk.InferenceModel.load(adapter_dir, template="chatml")


@pytest.fixture(scope="module")
def reference(model):
    merged = model.merge()
    ids = torch.tensor([model.encode(MESSAGES)])
    with torch.no_grad():
        return merged, ids, merged.model(ids).logits


def _load_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_f32_round_trip_gives_the_merged_models_logits(model, reference, tmp_path):
    merged, ids, logits = reference
    path = model.export_gguf(tmp_path / "run.gguf", dtype="f32")
    assert path == tmp_path / "run.gguf"
    back = _load_back(path)
    assert (_logits(back, ids) - logits).abs().max().item() < 1e-4
    assert not model.is_merged  # the adapter model is left as it was


def test_f16_round_trip_equals_the_merged_model_rounded_to_f16(model, reference, tmp_path):
    merged, ids, logits = reference
    back = _load_back(model.export_gguf(tmp_path / "run.gguf", dtype="f16"))
    rounded = {
        name: (p.half().float() if p.ndim == 2 else p) for name, p in merged.model.state_dict().items()
    }
    back_state = back.state_dict()
    assert all(torch.equal(back_state[name], value) for name, value in rounded.items())
    difference = (_logits(back, ids) - logits).abs().max().item()
    assert 0 < difference < 1e-2 * logits.abs().max().item()


def test_q8_0_loads_and_stays_close(model, reference, tmp_path):
    merged, ids, logits = reference
    path = model.export_gguf(tmp_path / "run.gguf", dtype="q8_0")
    assert path.stat().st_size < 0.6 * model.export_gguf(tmp_path / "f32.gguf", dtype="f32").stat().st_size
    back = _logits(_load_back(path), ids)
    assert (back - logits).abs().max().item() < 0.1 * logits.abs().max().item()
    assert (back.argmax(-1) == logits.argmax(-1)).float().mean().item() > 0.8


def test_the_stored_chat_template_renders_the_training_prompt(model, tmp_path):
    from transformers import AutoTokenizer

    path = model.export_gguf(tmp_path / "run.gguf", dtype="f16")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == model.tokenizer.decode(model.encode(MESSAGES))
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == model.encode(MESSAGES)
    assert tokenizer.eos_token == model.tokenizer.eos_token


@pytest.mark.parametrize("name", ["chatml", "alpaca", "zephyr"])
def test_the_modelfile_template_pieces_reproduce_the_prompts(name, tiny_tokenizer):
    template = get_template(name)
    pieces = ollama_pieces(template, tiny_tokenizer)
    conversation = [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    rendered = "".join(
        t for t, _ in template.render(conversation, tokenizer=tiny_tokenizer, add_generation_prompt=True)
    )
    assert (
        rendered
        == pieces["first"] + "U1" + pieces["header"] + "A1" + pieces["between"] + "U2" + pieces["header"]
    )
    text = modelfile("x.gguf", template, tiny_tokenizer)
    assert text.startswith('FROM ./x.gguf\nTEMPLATE """{{ if .System }}')
    assert '{{ if eq .Role "user" }}{{ .Content }}' + pieces["header"] in text
    for stop in template.stop_strings(tiny_tokenizer):
        assert f'PARAMETER stop "{stop}"' in text


def test_bad_dtype_and_the_cli(adapter_dir, model, tmp_path, capsys):
    with pytest.raises(ConfigError, match="pick one of f32, f16, q8_0"):
        model.export_gguf(tmp_path / "x.gguf", dtype="q4")
    out = tmp_path / "cli" / "model.gguf"
    assert main(["export", str(adapter_dir), str(out), "--dtype", "q8_0"]) == 0
    assert f"GGUF written to {out}" in capsys.readouterr().out
    assert out.is_file() and (out.parent / "Modelfile").read_text().startswith("FROM ./model.gguf\n")

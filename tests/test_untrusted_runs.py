"""Loading a run directory runs no code by surprise (issue 21 item 1): a recorded ``trust_remote_code``, a template
naming an unregistered class, and pickled weights are refused unless the caller opts in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inference import InferenceModel

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]

# A model shipping its own Python code: transformers imports this module (auto_map) only with
# trust_remote_code=True; importing it writes the marker file.
REMOTE_MODULE = """
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("imported")


class MarkerConfig(LlamaConfig):
    model_type = "lorakit_marker_llama"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def _lorakit(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    run = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(str(data), template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=2, lr=1e-3, batch_size=2, logging_steps=1, warmup_ratio=0.0)
        .train(root / "run")
    ).output_dir
    return Path(run), data


def _copy_run(run: Path, where: Path, **changes) -> Path:
    """A copy of the run whose record has ``changes`` applied (``model`` / ``template``)."""
    copy = where / "run-copy"
    shutil.copytree(run, copy)
    record_file = copy / "lorakit_run.json"
    record = json.loads(record_file.read_text())
    if "model" in changes:
        record["pipeline"]["model"].update(changes["model"])
    if "template" in changes:
        record["template"] = changes["template"]
    record_file.write_text(json.dumps(record))
    return copy


@pytest.fixture
def remote_base(tiny_model_dir, tmp_path):
    """The tiny Llama as a model with remote code: config.json's auto_map names ``marker_mod.py``."""
    base = tmp_path / "remote-base"
    shutil.copytree(tiny_model_dir, base)
    marker = tmp_path / "remote-code-ran"
    (base / "marker_mod.py").write_text(REMOTE_MODULE.format(marker=str(marker)))
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "lorakit_marker_llama"
    config["architectures"] = ["MarkerForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "marker_mod.MarkerConfig",
        "AutoModelForCausalLM": "marker_mod.MarkerForCausalLM",
    }
    (base / "config.json").write_text(json.dumps(config))
    return base, marker


def test_recorded_trust_remote_code_is_refused_without_the_opt_in(trained, remote_base, tmp_path):
    run, _ = trained
    base, marker = remote_base
    copy = _copy_run(run, tmp_path, model={"name_or_path": str(base), "trust_remote_code": True})
    with pytest.raises(ConfigError) as error:
        InferenceModel.load(copy)
    message = str(error.value)
    assert message.startswith(
        f"{copy / 'lorakit_run.json'} records trust_remote_code: true for the base model {str(base)!r}: "
        "loading it would run Python code shipped with that model."
    )
    assert "InferenceModel.load(..., trust_remote_code=True) (CLI: --trust-remote-code)" in message
    assert not marker.exists()
    # base= does not launder the record: the record is checked first, and the spec takes the caller's flag.
    with pytest.raises(ConfigError, match="records trust_remote_code: true"):
        InferenceModel.load(copy, base=str(base))
    assert not marker.exists()
    cli = _lorakit("eval", str(copy), str(trained[1]))
    assert cli.returncode == 2 and "records trust_remote_code: true" in cli.stderr
    assert "--trust-remote-code" in cli.stderr and not marker.exists()


def test_trust_remote_code_opt_in_runs_the_model_code(trained, remote_base, tmp_path):
    run, _ = trained
    base, marker = remote_base
    copy = _copy_run(run, tmp_path, model={"name_or_path": str(base), "trust_remote_code": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the remote config's fingerprint differs from the tiny Llama's
        model = InferenceModel.load(copy, trust_remote_code=True, allow_base_mismatch=True)
    assert model.base_spec.trust_remote_code is True
    assert marker.read_text() == "imported"
    assert type(model.model.get_base_model()).__name__ == "MarkerForCausalLM"


def test_base_override_takes_the_callers_flag_not_the_records(trained, tiny_model_dir, tmp_path):
    run, _ = trained
    copy = _copy_run(run, tmp_path, model={"trust_remote_code": False})
    model = InferenceModel.load(copy, base=tiny_model_dir)
    assert model.base_spec.trust_remote_code is False
    trusted = InferenceModel.load(copy, base=tiny_model_dir, trust_remote_code=True)
    assert trusted.base_spec.trust_remote_code is True


def test_template_class_in_the_record_is_refused(trained, tiny_model_dir, tmp_path):
    run, data = trained
    marker = tmp_path / "template-code-ran"
    evil = {"class": "subprocess:run", "args": [["touch", str(marker)]]}
    copy = _copy_run(run, tmp_path, template=evil)
    with pytest.raises(
        ConfigError, match="Template class 'subprocess:run' is not a registered template class"
    ):
        InferenceModel.load(copy)
    assert not marker.exists()
    model = InferenceModel.load(run)
    with pytest.raises(ConfigError, match="subprocess:run"):
        model.load_adapter(copy, name="evil")
    assert not marker.exists() and model.adapters == ["default"]
    cli = _lorakit("eval", str(copy), str(data))
    assert cli.returncode == 2 and "subprocess:run" in cli.stderr and not marker.exists()
    # a template given by the caller replaces the record's, which is then never built
    assert InferenceModel.load(copy, template="alpaca").template.name == "alpaca"
    assert not marker.exists()


def test_template_class_in_a_config_is_refused_by_explain(tiny_model_dir, tmp_path):
    marker = tmp_path / "config-template-ran"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = tmp_path / "evil.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": tiny_model_dir},
                "method": {"name": "lora", "r": 4},
                "data": {
                    "source": str(tmp_path / "rows.jsonl"),
                    "template": {"class": "subprocess:run", "args": [["touch", str(marker)]]},
                },
            }
        )
    )
    out = _lorakit("explain", str(config))
    assert out.returncode == 2, out.stderr
    assert "Template class 'subprocess:run' is not a registered template class" in out.stderr
    assert not marker.exists()


def test_config_asking_for_remote_code_is_refused_by_explain(remote_base, tmp_path):
    base, marker = remote_base
    config = tmp_path / "remote.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(base), "trust_remote_code": True},
                "method": {"name": "lora", "r": 4},
            }
        )
    )
    out = _lorakit("explain", str(config))
    assert out.returncode == 2 and "trust_remote_code" in out.stderr and not marker.exists()


def test_pickled_adapter_weights_are_refused_without_allow_pickle(trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    run, _ = trained
    copy = _copy_run(run, tmp_path)
    weights = load_file(copy / "adapter_model.safetensors")
    torch.save(weights, copy / "adapter_model.bin")
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError) as error:
        InferenceModel.load(copy)
    assert str(error.value) == (
        f"{copy / 'adapter_model.bin'} holds the weights as a pickle and there is no adapter_model.safetensors: "
        "loading it could run code stored in the file. Re-save the weights as safetensors (save_pretrained() "
        "writes them), or pass allow_pickle=True if you trust the directory (CLI: --allow-pickle)."
    )
    model = InferenceModel.load(run)
    with pytest.raises(ConfigError, match="adapter_model.bin holds the weights as a pickle"):
        model.load_adapter(copy, name="pickled")
    trusted = InferenceModel.load(copy, allow_pickle=True)
    assert trusted.generate("Say hello.", max_new_tokens=4) == model.generate("Say hello.", max_new_tokens=4)


def test_pickled_full_model_is_refused_without_allow_pickle(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    saved = tmp_path / "saved"
    shutil.copytree(tiny_model_dir, saved)
    torch.save(load_file(saved / "model.safetensors"), saved / "pytorch_model.bin")
    (saved / "model.safetensors").unlink()
    with pytest.raises(
        ConfigError, match=r"pytorch_model.bin holds the weights as a pickle .*no model.safetensors"
    ):
        InferenceModel.load(saved)
    with pytest.raises(ConfigError, match="allow_pickle=True"):
        InferenceModel.from_model(str(saved))

"""Issue 21 item 1: reading a config runs no code by surprise.

A config (dict, YAML / JSON file, run directory) cannot turn on ``trust_remote_code`` or import an unregistered
template class by itself: the caller opts in (``Pipeline.from_config(..., trust_remote_code=True,
trust_template_classes=True)``, the CLI's ``--trust-remote-code`` / ``--trust-template-classes``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lorakit as lk
import lorakit.distributed as dist
from lorakit.errors import ConfigError
from lorakit.models import load_model_config
from lorakit.rundir import RUN_FILE

ROWS = [{"instruction": "Say hello.", "input": "", "output": "hello"}] * 4
FIX = r"Pipeline.from_config\(\.\.\., trust_remote_code=True\) or the CLI flag --trust-remote-code"


def _config(model: str, **model_options) -> dict:
    return {
        "model": {"name_or_path": model, **model_options},
        "data": {"source": ROWS, "template": "alpaca"},
        "training": {"max_steps": 2},
    }


def _write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


# --- trust_remote_code ----------------------------------------------------------------------------------------


def test_yaml_config_with_trust_remote_code_needs_the_opt_in(tmp_path):
    path = _write_yaml(tmp_path / "remote.yaml", _config("some/remote-model", trust_remote_code=True))
    with pytest.raises(ConfigError) as caught:
        lk.Pipeline.from_config(path)
    message = str(caught.value)
    assert message.startswith(
        f"Pipeline config {path} sets trust_remote_code: true for model 'some/remote-model'"
    )
    assert "loading it would run Python code shipped with that model" in message
    assert message.endswith(
        "opt in with Pipeline.from_config(..., trust_remote_code=True) or the CLI flag --trust-remote-code."
    )
    with pytest.raises(ConfigError, match=f"^Pipeline config {path} .*{FIX}"):
        lk.Pipeline.from_config(str(path))
    pipeline = lk.Pipeline.from_config(path, trust_remote_code=True)
    assert pipeline.model is not None and pipeline.model.trust_remote_code is True
    assert pipeline.model.name_or_path == "some/remote-model"


def test_dict_and_run_directory_configs_need_the_opt_in(tmp_path):
    config = _config("some/remote-model", trust_remote_code=True)
    with pytest.raises(ConfigError, match=f"^The pipeline config dict sets trust_remote_code: true .*{FIX}"):
        lk.Pipeline.from_config(config)
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps({"pipeline": config}))
    with pytest.raises(ConfigError, match=f"^Pipeline config {run / RUN_FILE} sets trust_remote_code"):
        lk.Pipeline.from_config(run)
    assert lk.Pipeline.from_config(run, trust_remote_code=True).model.trust_remote_code is True
    # Without the flag in the config nothing changes, and from_model() in code is the caller's own opt-in.
    assert lk.Pipeline.from_config(_config("some/model")).model.trust_remote_code is False
    assert (
        lk.Pipeline.from_config(_config("some/model", trust_remote_code=False)).model.trust_remote_code
        is False
    )
    assert lk.Pipeline.from_model("some/model", trust_remote_code=True).model.trust_remote_code is True


@pytest.fixture
def remote_code_model(tiny_model_dir, tmp_path):
    """A local model directory whose config.json maps AutoConfig to a module that writes a marker on import."""
    model = tmp_path / "remote-code-model"
    model.mkdir()
    for name in Path(tiny_model_dir).iterdir():
        if name.suffix == ".json":
            shutil.copy(name, model / name.name)
    marker = tmp_path / "remote-code-ran"
    (model / "configuration_marker.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class MarkerConfig(LlamaConfig):\n"
        "    pass\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_marker.MarkerConfig"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_remote_code_model_runs_nothing_without_the_opt_in(remote_code_model, tmp_path):
    model, marker = remote_code_model
    path = _write_yaml(tmp_path / "remote.yaml", _config(str(model), trust_remote_code=True))
    with pytest.raises(ConfigError, match=f"^Pipeline config {path} .*{FIX}"):
        lk.Pipeline.from_config(path).explain()
    with pytest.raises(ConfigError, match=FIX):
        lk.Pipeline.from_config(path).plan()
    assert not marker.exists()
    # The opt-in is honoured: transformers imports the model's own module (the marker proves the test can fail).
    pipeline = lk.Pipeline.from_config(path, trust_remote_code=True)
    assert not marker.exists()  # building a pipeline loads nothing
    assert type(load_model_config(pipeline.model)).__name__ == "MarkerConfig"
    assert marker.read_text() == "imported"


# --- template classes -----------------------------------------------------------------------------------------


def _template_class_config(tmp_path: Path, model: str) -> tuple[dict, Path]:
    marker = tmp_path / "template-class-ran"
    config = _config(model)
    config["data"]["template"] = {"class": "subprocess:run", "args": [["touch", str(marker)]]}
    return config, marker


def test_unregistered_template_class_is_refused(tiny_model_dir, tmp_path):
    config, marker = _template_class_config(tmp_path, tiny_model_dir)
    path = _write_yaml(tmp_path / "template.yaml", config)
    unregistered = (
        "Template class 'subprocess:run' is not a registered template class, so it was not imported"
    )
    for source in (config, path):
        with pytest.raises(ConfigError, match=unregistered):
            lk.Pipeline.from_config(source)
        with pytest.raises(ConfigError, match=unregistered):
            lk.Pipeline.from_config(source).explain()
    # A pipeline built in code with the same dict as its template: explain() refuses it too.
    built = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, template=config["data"]["template"])
    with pytest.raises(ConfigError, match=unregistered):
        built.explain()
    assert not marker.exists()


# --- distributed workers --------------------------------------------------------------------------------------


def test_launch_command_carries_the_opt_ins():
    command, _ = dist.launch_command("c.json", "out", num_processes=2, cuda=False)
    assert command[-3:] == ["run", "c.json", "out"]
    command, _ = dist.launch_command(
        "c.json", "out", num_processes=2, cuda=False, trust_remote_code=True, trust_template_classes=True
    )
    assert command[-5:] == ["run", "c.json", "out", "--trust-remote-code", "--trust-template-classes"]


@pytest.fixture
def fake_launcher(monkeypatch):
    seen: dict = {}

    def fake_run(command, env, check):
        import subprocess

        seen["command"] = command
        seen["config"] = json.loads(Path(command[command.index("run") + 1]).read_text())
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(dist.subprocess, "run", fake_run)
    monkeypatch.setattr(dist, "_cuda_available", lambda: False)
    return seen


def _flags(command: list[str]) -> list[str]:
    return [arg for arg in command if arg.startswith("--trust")]


def test_launch_passes_what_a_pipeline_object_holds(fake_launcher, tmp_path):
    pipe = lk.Pipeline.from_model("some/remote-model", trust_remote_code=True).with_dataset(ROWS)
    assert dist.launch(pipe, tmp_path / "out", num_processes=2) == 0
    assert _flags(fake_launcher["command"]) == ["--trust-remote-code"]
    # The worker's from_config accepts the config with the flag it was given (and refuses it without).
    assert lk.Pipeline.from_config(fake_launcher["config"], trust_remote_code=True) == pipe
    plain = lk.Pipeline.from_model("some/model").with_dataset(ROWS)
    assert dist.launch(plain, tmp_path / "out", num_processes=2) == 0
    assert _flags(fake_launcher["command"]) == []
    assert dist.launch(plain, tmp_path / "out", num_processes=2, trust_template_classes=True) == 0
    assert _flags(fake_launcher["command"]) == ["--trust-template-classes"]


def test_launch_trusts_a_config_only_when_told(fake_launcher, tmp_path):
    config = _config("some/remote-model", trust_remote_code=True)
    path = tmp_path / "remote.json"
    path.write_text(json.dumps(config))
    for source, name in ((config, "The pipeline config dict"), (path, f"Pipeline config {path}")):
        with pytest.raises(ConfigError, match=f"^{name} sets trust_remote_code: true .*{FIX}"):
            dist.launch(source, tmp_path / "out", num_processes=2)
        assert "command" not in fake_launcher
    assert dist.launch(path, tmp_path / "out", num_processes=2, trust_remote_code=True) == 0
    assert _flags(fake_launcher["command"]) == ["--trust-remote-code"]
    assert dist.launch(_config("some/model"), tmp_path / "out", num_processes=2) == 0
    assert _flags(fake_launcher["command"]) == []


def test_worker_forwards_the_flags_to_from_config(tmp_path):
    calls = []

    class Builder:
        @staticmethod
        def from_config(config, **options):
            calls.append((config, options))
            raise ConfigError("stop here")

    for argv, expected in (
        (["run", "c.json", "out"], (False, False)),
        (["run", "c.json", "out", "--trust-remote-code"], (True, False)),
        (["run", "c.json", "out", "--trust-template-classes", "--overwrite"], (False, True)),
    ):
        with pytest.raises(ConfigError, match="stop here"):
            dist._main(Builder, argv)
        config, options = calls.pop()
        assert config == "c.json"
        assert options == {"trust_remote_code": expected[0], "trust_template_classes": expected[1]}


def test_launch_refuses_a_template_class_config_before_starting(fake_launcher, tmp_path):
    config, marker = _template_class_config(tmp_path, "some/model")
    with pytest.raises(
        ConfigError, match="Template class 'subprocess:run' is not a registered template class"
    ):
        dist.launch(config, tmp_path / "out", num_processes=2)
    assert "command" not in fake_launcher
    assert dist.launch(config, tmp_path / "out", num_processes=2, trust_template_classes=True) == 0
    assert _flags(fake_launcher["command"]) == ["--trust-template-classes"]
    assert not marker.exists()  # launching imports no template class; the opted-in workers would

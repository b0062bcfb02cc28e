"""The run directory: names, the run record, metrics and logs, template, provenance, checkpoints, housekeeping."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from lorakit import rundir
from lorakit.errors import ConfigError
from lorakit.rundir import RunDir


def _archive(path: Path) -> None:
    """A small torch-style zip archive (what torch.save writes)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 64)


def _checkpoint(run: RunDir, step: int, *, complete: bool = True) -> Path:
    """A checkpoint with every file a resume needs, sealed; ``complete=False``: only a weight file."""
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    if complete:
        (path / rundir.STATE_FILE).write_text("{}")
        (path / rundir.RESUME_FILE).write_text(json.dumps({"step": step}))
        for name in (rundir.OPTIMIZER_FILE, rundir.SCHEDULER_FILE, "rng_state.pth"):
            _archive(path / name)
        rundir.seal_checkpoint(path)
    return path


# --- names and paths ---------------------------------------------------------------------------------------


def test_paths_of_every_file(tmp_path):
    run = RunDir(tmp_path)
    assert {
        name: getattr(run, name).relative_to(tmp_path).as_posix()
        for name in (
            "run_file",
            "provenance_file",
            "template_file",
            "metrics_file",
            "metrics_log",
            "samples_log",
            "report_file",
            "curves_file",
            "quickstart_file",
            "adapter_config",
            "adapter_weights",
            "model_config",
            "tokenizer_config",
            "source_copy",
            "tensorboard_dir",
            "checkpoints_dir",
            "staging_dir",
        )
    } == {
        "run_file": "lorakit_run.json",
        "provenance_file": "lorakit_provenance.json",
        "template_file": "lorakit_template.json",
        "metrics_file": "metrics.json",
        "metrics_log": "metrics.jsonl",
        "samples_log": "samples.jsonl",
        "report_file": "report.md",
        "curves_file": "curves.png",
        "quickstart_file": "quickstart.json",
        "adapter_config": "adapter_config.json",
        "adapter_weights": "adapter_model.safetensors",
        "model_config": "config.json",
        "tokenizer_config": "tokenizer_config.json",
        "source_copy": "data/source.jsonl",
        "tensorboard_dir": "tensorboard",
        "checkpoints_dir": "checkpoints",
        "staging_dir": "checkpoints/.partial",
    }
    assert run.checkpoint(12) == tmp_path / "checkpoints" / "checkpoint-12"
    assert rundir.RUN_OUTPUTS == ("samples.jsonl", "report.md", "report.html", "curves.png")
    # the names inside a checkpoint
    assert (rundir.STATE_FILE, rundir.RESUME_FILE, rundir.METHOD_STATE_FILE) == (
        "trainer_state.json",
        "lorakit_resume.json",
        "lorakit_method_state.safetensors",
    )


def test_run_dir_is_frozen_and_expands_the_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    run = RunDir("~/runs/a")
    assert run.path == tmp_path / "runs" / "a"
    assert RunDir(str(tmp_path)) == RunDir(tmp_path)
    with pytest.raises(AttributeError):
        run.path = tmp_path  # type: ignore[misc]


def test_what_a_directory_holds(tmp_path):
    run = RunDir(tmp_path)
    assert (run.is_run(), run.is_adapter(), run.is_full_model()) == (False, False, False)
    run.model_config.write_text("{}")
    assert run.is_full_model()
    run.adapter_config.write_text("{}")
    assert run.is_adapter() and not run.is_full_model()
    run.write_run({"pipeline": {}})
    assert run.is_run()


# --- atomic writes -----------------------------------------------------------------------------------------


def test_write_json_atomic_writes_indented_json_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    rundir.write_json_atomic(path, {"b": 1, "a": Path("/p")})
    assert path.read_text() == '{\n  "b": 1,\n  "a": "/p"\n}\n'
    assert os.listdir(path.parent) == ["x.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "x.json"
    rundir.write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        rundir.write_json_atomic(path, {1j: "complex keys are not JSON"})
    assert json.loads(path.read_text()) == {"old": True}
    with pytest.raises(RuntimeError, match="crash"), rundir.atomic_target(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["x.json"]


def test_atomic_target_keeps_the_suffix(tmp_path):
    path = tmp_path / "curves.png"
    with rundir.atomic_target(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".curves.png.")
        tmp.write_bytes(b"png")
    assert path.read_bytes() == b"png" and not tmp.exists()


# --- the run record and metrics ----------------------------------------------------------------------------


def test_run_record_round_trip(tmp_path):
    run = RunDir(tmp_path)
    run.write_run({"pipeline": {"model": {"name_or_path": "m"}}, "precision": "fp32"})
    assert run.read_run() == {"pipeline": {"model": {"name_or_path": "m"}}, "precision": "fp32"}
    assert rundir.read_run(str(tmp_path)) == run.read_run()


def test_read_run_of_a_plain_peft_adapter_is_none(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert rundir.read_run(tmp_path) is None


def test_read_run_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(
        ConfigError,
        match=r"missing is not a directory; pass a lorakit run directory or a PEFT adapter directory\.",
    ):
        rundir.read_run(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file is not a directory"):
        rundir.read_run(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ConfigError,
        match=r"empty holds neither lorakit_run\.json \(a lorakit run\) nor adapter_config\.json \(a PEFT adapter\)\.",
    ):
        rundir.read_run(empty)
    (empty / "lorakit_run.json").write_text('{"pipeline": ')
    with pytest.raises(
        ConfigError, match=r"lorakit_run\.json is not valid JSON \(.*\); the run directory is damaged\."
    ) as caught:
        RunDir(empty).read_run()
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_metrics_round_trip(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == {}
    run.write_metrics({"train_loss": 1.5, "train_steps": 3})
    assert run.read_metrics() == {"train_loss": 1.5, "train_steps": 3}
    run.metrics_file.write_text("{")
    with pytest.raises(ConfigError, match=r"metrics\.json is not valid JSON"):
        run.read_metrics()


def test_template_round_trip(tmp_path):
    from lorakit.templates import get_template, template_from_dict

    run = RunDir(tmp_path)
    assert run.read_template() is None
    template = get_template("chatml")
    run.write_template(template)
    assert run.read_template() == template.to_dict()
    assert template_from_dict(run.read_template()).to_dict() == template.to_dict()
    run.write_template({"name": "alpaca"})
    assert json.loads(run.template_file.read_text()) == {"name": "alpaca"}


# --- logs --------------------------------------------------------------------------------------------------


def test_logs_append_and_read(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics_log() == [] and run.read_samples() == []
    run.log_metrics(1, {"loss": 2.0})
    run.log_metrics(2, {"loss": 1.0, "lr": 1e-4})
    run.log_samples([{"step": 2, "prompt": "é", "generation": "ü"}])
    assert run.metrics_log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0, "lr": 0.0001}\n'
    assert run.read_metrics_log() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "lr": 0.0001}]
    assert run.samples_log.read_text(encoding="utf-8") == '{"step": 2, "prompt": "é", "generation": "ü"}\n'
    assert run.read_samples() == [{"step": 2, "prompt": "é", "generation": "ü"}]


def test_read_log_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert rundir.read_log(path) == [{"step": 1}]


def test_truncation_keeps_lines_up_to_the_step_and_drops_a_torn_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_log.write_text(
        '{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"loss": 9}\n{"step": 3, "loss": 1}\n{"step": 2, "ev'
    )
    run.samples_log.write_text('{"step": 2, "prompt": "a"}\n{"step": 4, "prompt": "b"}\n')
    run.truncate_logs(2)
    assert run.metrics_log.read_text() == '{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"loss": 9}\n'
    assert run.samples_log.read_text() == '{"step": 2, "prompt": "a"}\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]
    rundir.truncate_log(tmp_path / "absent.jsonl", 1)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


# --- the training rows -------------------------------------------------------------------------------------


def test_source_for_config(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert run.source_for_config("train.jsonl") == str(data.resolve())
    assert run.source_for_config("org/dataset") == "org/dataset"  # a Hub id stays an id
    assert not run.source_copy.exists()
    rows = [{"prompt": "ä", "completion": "b"}]
    assert run.source_for_config(rows) == str(run.source_copy)
    assert run.source_copy.read_text(encoding="utf-8") == '{"prompt": "ä", "completion": "b"}\n'

    class Dataset:
        def to_list(self):
            return [{"text": "x"}, {"text": "y"}]

    run.source_for_config(Dataset())
    assert run.source_copy.read_text() == '{"text": "x"}\n{"text": "y"}\n'


# --- provenance --------------------------------------------------------------------------------------------


class _Spec:
    def __init__(self, name: str, revision: str | None = None) -> None:
        self.name_or_path, self.revision = name, revision


def _base(tmp_path: Path, name: str, **config) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, **config}))
    return str(path)


def test_config_fingerprint_ignores_volatile_keys():
    base = {"model_type": "llama", "hidden_size": 64}
    same = dict(base, torch_dtype="bfloat16", transformers_version="5.0", _name_or_path="/x", use_cache=False)
    assert rundir.config_fingerprint(base) == rundir.config_fingerprint(same)
    assert len(rundir.config_fingerprint(base)) == 16
    assert rundir.config_fingerprint(base) != rundir.config_fingerprint(dict(base, hidden_size=32))


def test_provenance_round_trip_and_base_checks(tmp_path):
    base = _base(tmp_path, "base")
    copy = _base(tmp_path, "copy", torch_dtype="float16")
    other = _base(tmp_path, "other", hidden_size=32)
    run = RunDir(tmp_path / "run")
    assert run.read_provenance() is None
    record = run.write_provenance(_Spec("org/base", "main"), base)
    assert record == {
        "base_model": "org/base",
        "base_model_path": base,
        "revision": "main",
        "config_fingerprint": rundir.base_fingerprint(base, None),
    }
    assert rundir.read_provenance(run.path) == record
    rundir.check_base(run.path, "copy", copy, None)  # the same config under another name: silent
    with pytest.raises(ConfigError, match=r"was trained on 'org/base' .* the base model given is 'other'"):
        rundir.check_base(run.path, "other", other, None)
    with pytest.warns(UserWarning, match=r"Loading it anyway \(allow_base_mismatch=True\)"):
        rundir.check_base(run.path, "other", other, None, allow_base_mismatch=True)
    rundir.check_base(tmp_path / "base", "other", other, None)  # no provenance: nothing to check
    run.provenance_file.write_text("{")
    with pytest.raises(ConfigError, match=r"lorakit_provenance\.json is not valid JSON"):
        run.read_provenance()


# --- checkpoints -------------------------------------------------------------------------------------------


def test_checkpoint_names_and_steps(tmp_path):
    assert rundir.checkpoint_name(7) == "checkpoint-7"
    assert rundir.checkpoint_step("checkpoint-40") == 40
    assert rundir.checkpoint_step(tmp_path / "checkpoint-3") == 3
    assert rundir.checkpoint_step("checkpoint-3.old") == -1
    assert rundir.checkpoint_step("checkpoints") == -1


def test_list_checkpoints_complete_ones_in_step_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoints() == []
    for step in (10, 2, 100):
        _checkpoint(run, step)
    _checkpoint(run, 50, complete=False)
    (run.checkpoints_dir / "checkpoint-x").mkdir()
    (run.checkpoints_dir / "checkpoint-7").write_text("a file")
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]


def test_find_resume_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"train\(resume=\.\.\.\): no complete checkpoint in .*checkpoints\."
    ):
        rundir.find_resume_checkpoint(run.path, True)
    first, last = _checkpoint(run, 1), _checkpoint(run, 2)
    assert rundir.find_resume_checkpoint(run.path, True) == last
    assert rundir.find_resume_checkpoint(tmp_path, str(run.path)) == last  # a run directory
    assert rundir.find_resume_checkpoint(tmp_path, run.checkpoints_dir) == last  # its checkpoints
    assert rundir.find_resume_checkpoint(tmp_path, first) == first  # one checkpoint
    with pytest.raises(
        ConfigError, match=r"train\(resume='.*nowhere'\): no such directory\. Pass a checkpoint directory"
    ):
        rundir.find_resume_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_publish_checkpoint_moves_the_staged_one_into_place(tmp_path):
    run = RunDir(tmp_path)
    staged = run.staging_dir / "checkpoint-5"
    staged.mkdir(parents=True)
    (staged / "new").write_text("1")
    assert rundir.publish_checkpoint(run.checkpoints_dir, 5) == run.checkpoint(5)
    assert os.listdir(run.checkpoint(5)) == ["new"] and not run.staging_dir.exists()
    staged.mkdir(parents=True)
    (staged / "newer").write_text("2")
    (run.staging_dir / "checkpoint-6").mkdir()  # another one still being written
    rundir.publish_checkpoint(run.checkpoints_dir, 5)
    assert os.listdir(run.checkpoint(5)) == ["newer"]
    assert os.listdir(run.staging_dir) == ["checkpoint-6"]


# --- starting a run ----------------------------------------------------------------------------------------


def test_check_output_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    run.check(overwrite=False)  # does not exist yet
    run.path.mkdir()
    run.check(overwrite=False)  # empty
    run.metrics_log.write_text("")
    with pytest.raises(
        ConfigError, match=r"train\('.*run'\): the directory is not empty\. Pick a new directory"
    ):
        run.check(overwrite=False)
    run.check(overwrite=True)
    with pytest.raises(ConfigError, match=r"train\('.*metrics\.jsonl'\): a file is in the way"):
        rundir.check_output_dir(run.metrics_log, overwrite=True)


def test_clear_for_fresh_run_moves_the_whole_previous_run_aside(tmp_path):
    run = RunDir(tmp_path)
    for path in (
        run.metrics_log,
        run.metrics_file,
        run.run_file,
        run.samples_log,
        run.report_file,
        run.curves_file,
        run.tokenizer_config,
    ):
        path.write_text("old")
    run.adapter_config.write_text("{}")
    run.adapter_weights.write_bytes(b"old weights")
    run.tensorboard_dir.mkdir()
    (tmp_path / rundir.LOCK_FILE).write_text("{}")
    (tmp_path / "notes.py").write_text("the user's")  # not a run output: stays
    _checkpoint(run, 3)
    run.clear_for_fresh_run()
    assert sorted(os.listdir(tmp_path)) == [rundir.REPLACED_DIR, rundir.LOCK_FILE, "notes.py"]
    aside = tmp_path / rundir.REPLACED_DIR
    assert (aside / "adapter_model.safetensors").read_bytes() == b"old weights"
    assert (aside / "checkpoints" / "checkpoint-3" / rundir.MANIFEST_FILE).is_file()
    run.clear_for_fresh_run()  # nothing new to move: the old copy of a crashed overwrite is dropped
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK_FILE, "notes.py"]
    run.adapter_weights.write_bytes(b"x")
    run.clear_for_fresh_run()
    run.drop_replaced()
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK_FILE, "notes.py"]


def test_prepare_resume(tmp_path):
    run = RunDir(tmp_path)
    checkpoint = _checkpoint(run, 2)
    (run.staging_dir / "checkpoint-4").mkdir(parents=True)
    run.metrics_log.write_text('{"step": 2}\n{"step": 3}\n')
    run.samples_log.write_text('{"step": 3}\n')
    for path in (run.metrics_file, run.report_file, run.curves_file, run.run_file):
        path.write_text("x")
    with pytest.warns(UserWarning, match=r"Removing the incomplete checkpoint left by a crash: .*\.partial"):
        run.prepare_resume(checkpoint)
    assert not run.staging_dir.exists() and checkpoint.is_dir()
    assert run.metrics_log.read_text() == '{"step": 2}\n' and run.samples_log.read_text() == ""
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoints",
        "lorakit_run.json",
        "metrics.jsonl",
        "samples.jsonl",
    ]


# --- the tracker and the report write through the run directory --------------------------------------------


def test_tracker_samples_and_report(tmp_path, monkeypatch, capsys):
    import lorakit as lk
    from lorakit.tracking import Tracker, write_run_report

    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-value")
    pipeline = (
        lk.Pipeline.from_model("some/model").with_lora(r=4).with_dataset([{"prompt": "a", "completion": "b"}])
    )
    run = RunDir(tmp_path)
    tracker = Tracker(pipeline, tmp_path)
    tracker.log_samples(3, [{"step": 3, "prompt": "say s3cr3t-value", "generation": "ok"}])
    assert run.read_samples() == [{"step": 3, "prompt": "say ***", "generation": "ok"}]
    assert "lorakit samples at step 3" in capsys.readouterr().out
    Tracker(pipeline, tmp_path, active=False).log_samples(4, [{"step": 4, "prompt": "p", "generation": "g"}])
    assert len(run.read_samples()) == 1  # an inactive tracker (not the main process) writes nothing
    run.log_metrics(1, {"loss": 2.0})
    run.log_metrics(2, {"eval_loss": 1.5, "eval_runtime": 0.1})
    path = write_run_report(tmp_path, pipeline=pipeline, metrics={"train_loss": 1.25})
    assert path == run.report_file
    report = path.read_text()
    assert "| train_loss | 1.25 |" in report and "| 2 | 1.5 |" in report and "eval_runtime" not in report
    assert "## Samples at step 3\n\n- `say ***` -> 'ok'" in report
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary file left
    assert report.endswith("Every logged step: `metrics.jsonl`. Config: `lorakit_run.json`.\n")

"""Corrupt, missing and half-written artifacts get a LorakitError naming the file and the fix (issue 21 item 2),
and a resume skips an incomplete checkpoint for the previous complete one (item 3, unit level)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import lorakit as lk
from lorakit import rundir
from lorakit.errors import ConfigError, CorruptArtifactError
from lorakit.inference import InferenceModel

ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    return (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=3, lr=1e-3, batch_size=2, logging_steps=1, warmup_ratio=0.0)
        .with_checkpoints(every=1)
        .train(tmp_path_factory.mktemp("corrupt") / "run")
    ).output_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


# --- adapter weights ------------------------------------------------------------------------------------------


def test_the_run_records_the_weights_checksum_and_loads_intact(trained):
    record = json.loads((trained / rundir.RUN_FILE).read_text())
    digest = rundir.sha256_file(trained / rundir.ADAPTER_WEIGHTS)
    assert record["checksums"] == {rundir.ADAPTER_WEIGHTS: digest}
    rundir.check_artifacts(rundir.RunDir(trained), record)  # nothing raised
    assert InferenceModel.load(trained).adapters == ["default"]


def _cut_to_a_third(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _zero_the_last_100_bytes(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100] + bytes(100))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_cut_to_a_third, r"adapter_model\.safetensors is cut short: \d+ bytes, its header describes \d+"),
        (lambda p: p.write_bytes(b""), r"adapter_model\.safetensors is empty: no safetensors header"),
        (_zero_the_last_100_bytes, r"adapter_model\.safetensors does not match the SHA-256 recorded"),
        (lambda p: p.unlink(), r"adapter_model\.safetensors is missing beside adapter_config\.json"),
        (
            lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10),
            r"adapter_model\.safetensors is \d+ bytes, its header describes \d+: extra bytes after",
        ),
    ],
    ids=["truncated", "empty", "zeroed-tail", "missing", "padded"],
)
def test_damaged_adapter_weights_are_named_before_peft_reads_them(trained, tmp_path, damage, expected):
    copy = _copy(trained, tmp_path)
    damage(copy / rundir.ADAPTER_WEIGHTS)
    with pytest.raises(CorruptArtifactError, match=expected) as caught:
        InferenceModel.load(copy)
    message = str(caught.value)
    assert message.startswith(f"{copy} cannot be loaded:")
    assert "Copy the run directory again from where it was made, load one of its checkpoints" in message


def test_load_adapter_and_evaluate_check_the_files_too(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    _cut_to_a_third(copy / rundir.ADAPTER_WEIGHTS)
    model = InferenceModel.load(trained)
    with pytest.raises(CorruptArtifactError, match=r"adapter_model\.safetensors is cut short"):
        model.load_adapter(copy, name="broken")
    assert model.adapters == ["default"]
    with pytest.raises(CorruptArtifactError, match=r"adapter_model\.safetensors is cut short"):
        lk.evaluate(model=copy, data=ROWS[:1])


def test_a_run_record_without_adapter_or_model_is_not_looked_up_on_the_hub(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    (copy / rundir.ADAPTER_WEIGHTS).unlink()
    (copy / rundir.ADAPTER_CONFIG).unlink()
    with pytest.raises(
        CorruptArtifactError, match=r"neither the adapter \(adapter_config\.json\) nor a model"
    ):
        InferenceModel.load(copy)


# --- the run record and the tokenizer -------------------------------------------------------------------------


def test_broken_run_records(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    record_file = copy / rundir.RUN_FILE
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps([record]))
    with pytest.raises(CorruptArtifactError, match=r"lorakit_run\.json holds a JSON list, not a run record"):
        InferenceModel.load(copy)
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k != "template"}))
    with pytest.raises(CorruptArtifactError, match=r"lorakit_run\.json has no 'template'"):
        InferenceModel.load(copy)
    record_file.write_text(json.dumps({**record, "pipeline": {}}))
    with pytest.raises(CorruptArtifactError, match=r"lorakit_run\.json has no 'pipeline\.model' section"):
        InferenceModel.load(copy)
    record_file.write_text(json.dumps(record)[:40])
    with pytest.raises(
        ConfigError, match=r"lorakit_run\.json is not valid JSON .*the run directory is damaged"
    ):
        InferenceModel.load(copy)


def test_a_tokenizer_without_its_files(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(
        CorruptArtifactError, match=r"tokenizer_config\.json is there but none of the tokenizer's"
    ):
        InferenceModel.load(copy)
    (copy / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CorruptArtifactError, match=r"tokenizer\.json is not valid JSON"):
        InferenceModel.load(copy)


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_checkpoints_are_sealed_with_a_manifest(trained):
    checkpoint = trained / "checkpoints" / "checkpoint-3"
    listed = json.loads((checkpoint / rundir.MANIFEST_FILE).read_text())["files"]
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "lorakit_resume.json",
    } <= set(listed)
    assert listed["adapter_model.safetensors"] == [
        (checkpoint / "adapter_model.safetensors").stat().st_size,
        rundir.sha256_file(checkpoint / "adapter_model.safetensors"),
    ]
    assert rundir.check_checkpoint(checkpoint) == []


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _break_json(path: Path) -> None:
    path.write_text(path.read_text()[:20])


DAMAGE = {
    "optimizer.pt": (_truncate, r"optimizer\.pt is \d+ bytes, \d+ when it was saved \(cut short\)"),
    "rng_state.pth": (_truncate, r"rng_state\.pth is \d+ bytes, \d+ when it was saved"),
    "scheduler.pt": (lambda p: p.unlink(), r"the scheduler state \(scheduler\.pt\) is missing"),
    "lorakit_resume.json": (_break_json, r"lorakit_resume\.json is \d+ bytes"),
    "trainer_state.json": (
        lambda p: p.write_text(p.read_text().replace("1", "2")),
        r"trainer_state\.json does not match its SHA-256",
    ),
    "adapter_model.safetensors": (_truncate, r"adapter_model\.safetensors is \d+ bytes"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_an_incomplete_checkpoint_is_named_and_skipped(trained, tmp_path, name):
    copy = _copy(trained, tmp_path)
    last = copy / "checkpoints" / "checkpoint-3"
    damage, expected = DAMAGE[name]
    damage(last / name)
    problems = rundir.check_checkpoint(last)
    assert len(problems) == 1 and re.search(expected, problems[0]), problems
    with pytest.raises(CorruptArtifactError, match=rf"Cannot resume from {last}: it is incomplete"):
        rundir.find_resume_checkpoint(copy, str(last))
    with pytest.warns(UserWarning, match=rf"Skipping incomplete checkpoints \(checkpoint-3: {expected}"):
        assert rundir.find_resume_checkpoint(copy, True) == copy / "checkpoints" / "checkpoint-2"


def test_checkpoints_without_a_manifest_get_structural_checks(trained, tmp_path):
    copy = _copy(trained, tmp_path)
    checkpoints = [copy / "checkpoints" / f"checkpoint-{step}" for step in (2, 3)]  # keep=2
    assert rundir.list_checkpoints(copy / "checkpoints") == checkpoints
    for checkpoint in checkpoints:
        (checkpoint / rundir.MANIFEST_FILE).unlink()  # written before manifests existed
    assert rundir.check_checkpoint(checkpoints[1]) == []
    _truncate(checkpoints[1] / "optimizer.pt")
    assert rundir.check_checkpoint(checkpoints[1]) == [
        f"optimizer.pt is not a complete torch archive ({(checkpoints[1] / 'optimizer.pt').stat().st_size} "
        "bytes): cut short or damaged"
    ]
    with pytest.warns(UserWarning, match=r"checkpoint-3: optimizer\.pt is not a complete torch archive"):
        assert rundir.find_resume_checkpoint(copy, True) == checkpoints[0]
    _break_json(checkpoints[0] / "lorakit_resume.json")
    (checkpoints[0] / "rng_state.pth").unlink()
    with pytest.raises(
        ConfigError, match=r"no complete checkpoint in .*checkpoint-2: the RNG state \(rng_state"
    ):
        rundir.find_resume_checkpoint(copy, True)

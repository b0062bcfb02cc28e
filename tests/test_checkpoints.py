"""Checkpoints, resume, early stopping and the NaN guard on the tiny offline Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.config import EarlyStopSpec
from lorakit.errors import ConfigError, TrainingError
from lorakit.rundir import list_checkpoints
from lorakit.trainer import EarlyStopper

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Route this ticket.", "input": "I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket.", "input": "My parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "How are you?", "input": "", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# --- early stopping -------------------------------------------------------------------------------------


def test_early_stopper_on_crafted_sequences():
    stopper = EarlyStopper(EarlyStopSpec(patience=2))  # eval_loss: lower is better
    decisions = [
        stopper.update({"eval_loss": v}, step)
        for step, v in zip((10, 20, 30, 40), (1.0, 0.8, 0.85, 0.81), strict=True)
    ]
    assert decisions == [False, False, False, True] and stopper.stopped_step == 40 and stopper.best == 0.8
    assert stopper.update({"eval_loss": 0.1}, 40) is True  # the same step again changes nothing

    rising = EarlyStopper(EarlyStopSpec(patience=1, metric="rougeL", min_delta=0.05))
    assert rising.spec.direction == "max"
    assert [rising.update({"eval_rougeL": v}, s) for s, v in ((1, 0.2), (2, 0.3), (3, 0.33))] == [
        False,
        False,
        True,
    ]
    with pytest.raises(ConfigError, match=r"produced no 'eval_rougeL'; it produced \['eval_loss'\]"):
        EarlyStopper(EarlyStopSpec(patience=1, metric="rougeL")).update({"eval_loss": 1.0}, 1)


def _crafted(values):
    sequence = iter(values)

    def crafted(predictions, references):
        return next(sequence)

    return crafted


def test_early_stopping_stops_at_the_expected_step_and_loads_the_best(tiny_model_dir, tmp_path):
    # Evaluations at steps 2, 4, 6, 8: 0.5, 0.6 (best), 0.4, 0.3 -> two without improvement -> stop at step 8.
    metric = _crafted([0.5, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val=ROWS[:2], max_length=128)
        .with_training(
            max_steps=20, lr=5e-3, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
        )
        .with_eval([metric], every=2, samples=1, max_new_tokens=1)
        .with_checkpoints(every=2, keep=1, best_metric="crafted")
        .early_stopping(patience=2, metric="crafted", mode="max")
        .train(tmp_path / "run")
    )
    assert result.metrics["train_steps"] == 8
    assert result.metrics["early_stopped_at_step"] == 8
    assert result.metrics["best_step"] == 4 and result.metrics["best_eval_crafted"] == 0.6
    evals = [entry["eval_crafted"] for entry in _log(result.output_dir) if "eval_crafted" in entry]
    assert evals[:4] == [0.5, 0.6, 0.4, 0.3]
    # keep=1 still keeps the best and the latest; the run directory holds the best adapter.
    kept = [p.name for p in list_checkpoints(result.output_dir / "checkpoints")]
    assert kept == ["checkpoint-4", "checkpoint-8"]
    final, best = _adapter(result.output_dir), _adapter(result.output_dir / "checkpoints" / "checkpoint-4")
    latest = _adapter(result.output_dir / "checkpoints" / "checkpoint-8")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], latest[k]) for k in final)


# --- SIGKILL in the middle of a save, then resume -----------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import lorakit.rundir as rd

    data, model_dir, out, marker = sys.argv[1:5]
    real_write = rd.write_json_atomic

    def slow_write(path, record):
        # Stall the save of checkpoint-6 half-way (files written, not yet renamed) so the parent can kill us.
        if path.name == rd.RESUME_FILE and record.get("step") == 6:
            Path(marker).write_text("saving checkpoint-6")
            time.sleep(300)
        real_write(path, record)

    rd.write_json_atomic = slow_write
    import lorakit as lk

    sys.path.insert(0, {tests!r})
    from test_checkpoints import resumable

    resumable(model_dir, data).train(out)
    """
)


def resumable(model_dir, data):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.1)
        .with_dataset(data, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=8, lr=5e-3, batch_size=2, logging_steps=1, warmup_ratio=0.25, seed=7)
        .with_checkpoints(every=3, keep=2)
    )


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, rows_file, tmp_path_factory):
    return resumable(tiny_model_dir, rows_file).train(tmp_path_factory.mktemp("runs") / "whole")


def test_sigkill_during_a_save_then_resume_equals_the_uninterrupted_run(
    tiny_model_dir, rows_file, uninterrupted, tmp_path
):
    out, marker = tmp_path / "killed", tmp_path / "marker"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lk.__file__).parents[1]), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, str(script), rows_file, tiny_model_dir, str(out), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before the save: {child.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the child never reached checkpoint-6"
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    # The crash left checkpoint-6 half-written aside; checkpoint-3 is complete and the latest usable one.
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-3"]
    assert (checkpoints / ".partial" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-6").exists()
    assert not (out / "adapter_model.safetensors").exists()

    initial = _adapter(checkpoints / "checkpoint-3")
    with pytest.warns(UserWarning, match="incomplete checkpoint left by a crash"):
        resumed = resumable(tiny_model_dir, rows_file).train(out, resume=True)
    assert not (checkpoints / ".partial").exists()
    assert resumed.metrics["train_steps"] == uninterrupted.metrics["train_steps"] == 8
    whole, after = _adapter(uninterrupted.output_dir), _adapter(out)
    assert whole.keys() == after.keys() and len(whole) == 28
    for name in whole:
        torch.testing.assert_close(after[name], whole[name], rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(initial[k], after[k]) for k in after)  # steps 4-8 really ran after the resume
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-6", "checkpoint-8"]  # keep=2
    # One loss per step in the log (lines past checkpoint-3 from the killed run were dropped), equal to the
    # uninterrupted run's.
    losses = {e["step"]: e["loss"] for e in _log(out) if "loss" in e}
    reference = {e["step"]: e["loss"] for e in _log(uninterrupted.output_dir) if "loss" in e}
    assert sorted(losses) == list(range(1, 9)) and len([e for e in _log(out) if "loss" in e]) == 8
    assert losses == pytest.approx(reference, rel=1e-4)


def test_resume_refuses_another_config_or_other_data(tiny_model_dir, rows_file, uninterrupted, tmp_path):
    run = uninterrupted.output_dir
    changed = (
        resumable(tiny_model_dir, rows_file).with_training(lr=1e-3).with_lora(r=4, alpha=16, dropout=0.1)
    )
    with pytest.raises(ConfigError) as error:
        changed.train(run, resume=True)
    message = str(error.value)
    assert f"Cannot resume from {run / 'checkpoints' / 'checkpoint-8'}: this run differs" in message
    assert "training.lr: 0.005 in the checkpoint, 0.001 now" in message
    assert "method.r: 8 in the checkpoint, 4 now" in message
    other_rows = tmp_path / "other.jsonl"
    other_rows.write_text("".join(json.dumps({**r, "output": r["output"] + "!"}) + "\n" for r in ROWS))
    with pytest.raises(ConfigError, match=r"training data: the tokenized rows differ \(8 rows"):
        resumable(tiny_model_dir, str(other_rows)).train(
            run, resume=str(run / "checkpoints" / "checkpoint-6")
        )
    with pytest.raises(ConfigError, match="no complete checkpoint in"):
        resumable(tiny_model_dir, rows_file).train(tmp_path / "empty", resume=True)


# --- NaN / inf guard ------------------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    out = tmp_path / "nan"
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=10, lr=5e-3, batch_size=4, logging_steps=1)
        .with_checkpoints(every=2)
    )
    with pytest.raises(TrainingError) as error:
        pipeline.train(out, callbacks=[Poison()])
    message = str(error.value)
    assert "The training loss became nan at step 6" in message
    assert f"The last good checkpoint is {out / 'checkpoints' / 'checkpoint-4'} (step 4)" in message
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    kept = _adapter(out / "checkpoints" / "checkpoint-4")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (out / "adapter_model.safetensors").exists()  # no NaN adapter was saved as the result


def test_data_fingerprint_depends_on_rows_not_on_their_arrow_layout():
    from datasets import Dataset

    from lorakit.checkpoints import data_fingerprint

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    listed = data_fingerprint(Dataset.from_list(rows))
    assert listed == data_fingerprint(Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}))
    assert listed == data_fingerprint(Dataset.from_list(rows[::-1]).select([1, 0]))
    assert listed != data_fingerprint(Dataset.from_list(rows[::-1]))  # order matters (data position)
    moved = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}]
    assert listed != data_fingerprint(Dataset.from_list(moved))  # same tokens, other row boundaries


def test_check_resume_needs_a_readable_resume_record(tmp_path):
    from lorakit.checkpoints import check_resume, write_resume_record

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    meta = {"config": {"training": {"lr": 0.1}}, "data_fingerprint": "ab" * 32, "train_rows": 8}
    with pytest.raises(ConfigError, match=r"it has no lorakit_resume\.json, so lorakit cannot check"):
        check_resume(checkpoint, meta)
    (checkpoint / "lorakit_resume.json").write_text('{"config": ')  # torn by a crash
    with pytest.raises(
        ConfigError, match=r"lorakit_resume\.json is not valid JSON .*the run directory is damaged"
    ):
        check_resume(checkpoint, meta)
    write_resume_record(checkpoint, dict(meta, step=4))
    assert check_resume(checkpoint, meta) == dict(meta, step=4)
    other = dict(meta, config={"training": {"lr": 0.2}})
    with pytest.raises(ConfigError, match=r"training\.lr: 0\.1 in the checkpoint, 0\.2 now"):
        check_resume(checkpoint, other)


def test_method_state_round_trips_through_its_file(tmp_path):
    from lorakit.checkpoints import read_method_state, write_method_state

    assert read_method_state(tmp_path) is None
    write_method_state(tmp_path, {"ranknum": torch.tensor([1.0, 2.0])}, {"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["lorakit_method_state.safetensors"]  # no temporary left
    tensors, info = read_method_state(tmp_path)
    assert torch.equal(tensors["ranknum"], torch.tensor([1.0, 2.0])) and info == {"step": 3}


# --- AdaLoRA: the rank allocator's importance state survives a SIGKILL and a resume ---------------------

ADALORA_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback

    sys.path.insert(0, {tests!r})
    from test_checkpoints import adalora_resumable

    data, model_dir, out = sys.argv[1:4]

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # checkpoint-4 is complete; step 5 is lost
                os.kill(os.getpid(), signal.SIGKILL)

    adalora_resumable(model_dir, data).train(out, callbacks=[Kill()])
    """
)


def adalora_resumable(model_dir, data):
    # Allocation steps 0-7: warm-up at 0-1 (tinit=1), budget shrinking at 2-5 from the importance estimates,
    # fixed at 6 (total 8 - tfinal 2), fine-tuning at 7. checkpoint-4 falls in the middle of the shrinking.
    return (
        lk.Pipeline.from_model(model_dir)
        .with_adalora(init_r=4, target_r=2, alpha=8, dropout=0.1, tinit=1, tfinal=2)
        .with_dataset(data, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=8, lr=5e-2, batch_size=2, logging_steps=1, warmup_ratio=0.25, seed=7)
        .with_checkpoints(every=2, keep=2)
    )


def test_adalora_killed_then_resumed_equals_the_uninterrupted_run(tiny_model_dir, rows_file, tmp_path):
    from safetensors import safe_open

    from lorakit.rundir import METHOD_STATE_FILE

    whole = adalora_resumable(tiny_model_dir, rows_file).train(tmp_path / "whole")
    out, script = tmp_path / "killed", tmp_path / "child.py"
    script.write_text(ADALORA_CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lk.__file__).parents[1]), *sys.path])}
    child = subprocess.run(
        [sys.executable, str(script), rows_file, tiny_model_dir, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-4"]
    with safe_open(str(checkpoints / "checkpoint-4" / METHOD_STATE_FILE), framework="pt") as handle:
        kinds = {key.split("/", 1)[0] for key in handle.keys()}  # noqa: SIM118
        assert json.loads(handle.metadata()["info"])["rank_pattern"]  # the budget had started shrinking
    assert kinds == {"ipt", "exp_avg_ipt", "exp_avg_unc"}

    resumed = adalora_resumable(tiny_model_dir, rows_file).train(out, resume=True)
    assert resumed.metrics["train_steps"] == whole.metrics["train_steps"] == 8
    expected, after = _adapter(whole.output_dir), _adapter(out)
    assert expected.keys() == after.keys() and len(expected) == 42  # lora_A, lora_B, lora_E x 14 modules
    for name in expected:
        assert after[name].shape == expected[name].shape, name
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6)
    pattern = json.loads((whole.output_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == pattern
    assert len(set(map(sum, pattern.values()))) > 1  # the budget really moved between modules


def test_adalora_ends_with_the_best_checkpoints_weights_and_rank_pattern(tiny_model_dir, tmp_path):
    from lorakit.checkpoints import read_method_state

    # Evaluations at steps 2, 4, 6, 8; the rank budget shrinks at steps 2-5, so patterns differ between them.
    metric = _crafted([0.1, 0.9, 0.2, 0.3] + [0.0] * 8)  # the best by this metric is checkpoint-4
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_adalora(init_r=4, target_r=2, alpha=8, dropout=0.0, tinit=1, tfinal=2)
        .with_dataset(ROWS, template="alpaca", val=ROWS[:2], max_length=128)
        .with_training(max_steps=8, lr=5e-2, batch_size=4, logging_steps=1, warmup_ratio=0.0, seed=7)
        .with_eval([metric], every=2, samples=1, max_new_tokens=1)
        .with_checkpoints(every=2, keep=1, best_metric="crafted")
        .train(tmp_path / "run")
    )
    assert result.metrics["best_step"] == 4
    best = result.output_dir / "checkpoints" / "checkpoint-4"
    _, info = read_method_state(best)
    expected = {name.replace(".default", ""): mask for name, mask in info["rank_pattern"].items()}
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == expected
    final, full = _adapter(result.output_dir), _adapter(best)  # the checkpoint keeps the full-size tensors
    assert final.keys() == full.keys()
    for name, tensor in final.items():
        module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".lora_E"
        kept = torch.tensor(expected[module])
        # AdaLoRA's factors are ParameterDict entries: "...q_proj.lora_A", "...lora_E", "...lora_B" (columns)
        picked = full[name][:, kept] if name.endswith(".lora_B") else full[name][kept]
        assert torch.equal(tensor, picked), name


# --- a half-written last checkpoint: resume falls back to the previous complete one ----------------------------


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _torn_json(path: Path) -> None:
    path.write_text(path.read_text()[:25])


@pytest.mark.parametrize(
    ("name", "damage"),
    # rng_state.pth and lorakit_resume.json: the same skip, checked without training in test_corrupt_artifacts
    [("optimizer.pt", _cut), ("trainer_state.json", _torn_json)],
)
def test_resume_skips_a_damaged_last_checkpoint_and_equals_the_uninterrupted_run(
    tiny_model_dir, rows_file, uninterrupted, tmp_path, name, damage
):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted.output_dir, out)
    (out / "lorakit.lock").unlink(missing_ok=True)
    damage(out / "checkpoints" / "checkpoint-8" / name)
    with pytest.warns(UserWarning, match=rf"Skipping incomplete checkpoints \(checkpoint-8: {name}"):
        resumed = resumable(tiny_model_dir, rows_file).train(out, resume=True)
    assert resumed.metrics["train_steps"] == 8
    whole, after = _adapter(uninterrupted.output_dir), _adapter(out)
    assert whole.keys() == after.keys()
    for key in whole:
        torch.testing.assert_close(after[key], whole[key], rtol=1e-5, atol=1e-6)
    # The damaged checkpoint was replaced by a complete one of the same step.
    from lorakit.rundir import check_checkpoint

    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-6", "checkpoint-8"]
    assert check_checkpoint(out / "checkpoints" / "checkpoint-8") == []


# --- a full disk during a save ---------------------------------------------------------------------------------


def test_enospc_during_a_save_keeps_the_previous_checkpoint_and_says_so(
    tiny_model_dir, rows_file, uninterrupted, tmp_path, monkeypatch
):
    import errno

    from lorakit.errors import StorageError
    from lorakit.rundir import check_checkpoint

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and "checkpoint-6" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "full"
    with pytest.raises(StorageError) as caught:
        resumable(tiny_model_dir, rows_file).train(out)
    message = str(caught.value)
    assert f"The disk is full while writing into {out}" in message
    assert f"the last complete checkpoint, {out / 'checkpoints' / 'checkpoint-3'}, is intact" in message
    assert "then continue with train(dir, resume=True)" in message
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-3"]
    assert check_checkpoint(out / "checkpoints" / "checkpoint-3") == []
    assert not (out / "checkpoints" / ".partial").exists()  # the half-written copy freed its space
    assert not (out / "lorakit.lock").exists()  # released on the error
    monkeypatch.setattr(torch, "save", real_save)
    resumed = resumable(tiny_model_dir, rows_file).train(out, resume=True)
    whole, after = _adapter(uninterrupted.output_dir), _adapter(out)
    assert resumed.metrics["train_steps"] == 8
    for key in whole:
        torch.testing.assert_close(after[key], whole[key], rtol=1e-5, atol=1e-6)

"""One writer per run directory (issue 21 item 4) and the storage checks before any weights load (item 5)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lorakit as lk
from lorakit import rundir
from lorakit.errors import ConfigError, RunLockedError, StorageError
from lorakit.inference import InferenceModel
from lorakit.runlock import RunLock, lock_holder

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


def _pipeline(model_dir):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=2, lr=1e-3, batch_size=2, logging_steps=1, warmup_ratio=0.0)
    )


@pytest.fixture
def no_weight_load(monkeypatch):
    """Fail the test if train() gets as far as loading the base model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded")

    monkeypatch.setattr("lorakit.training.load_base_model", refuse)


# --- the lock file --------------------------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_refuses_a_second_writer(tmp_path):
    run = tmp_path / "run"
    with RunLock.hold(run) as lock:
        holder = json.loads((run / rundir.LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock_holder(run) == holder
        with pytest.raises(RunLockedError) as caught:
            RunLock(run).acquire()
        assert str(caught.value).startswith(
            f"{run} is being written by another process (pid {os.getpid()} on host {socket.gethostname()!r}, "
            f"since {holder['since']}): one run directory takes one writer."
        )
        assert lock.held
    assert not run.exists()  # created for the lock, empty again: removed
    with pytest.raises(RuntimeError, match="boom"), RunLock.hold(run):
        (run / "metrics.jsonl").write_text("")
        raise RuntimeError("boom")
    assert os.listdir(run) == ["metrics.jsonl"]  # released on the error; the directory stays


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_honoured(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file = tmp_path / rundir.LOCK_FILE
    stale = {"pid": gone.pid, "host": socket.gethostname(), "since": "yesterday"}
    lock_file.write_text(json.dumps(stale))
    assert lock_holder(tmp_path) is None
    with pytest.warns(
        UserWarning, match=rf"Taking over the stale lock .*\(pid {gone.pid} on host .*yesterday"
    ):
        RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    # Our own pid but another process start time: the pid was reused, the holder is gone.
    lock_file.write_text(json.dumps({**stale, "pid": os.getpid(), "process_start": "1"}))
    assert lock_holder(tmp_path) is None
    lock_file.write_text("{torn")
    assert lock_holder(tmp_path) is None
    other = {"pid": gone.pid, "host": "another-machine", "since": "today"}
    lock_file.write_text(json.dumps(other))
    assert lock_holder(tmp_path) == other  # lorakit cannot see that host's processes
    with pytest.raises(RunLockedError, match=rf"delete {lock_file}"):
        RunLock(tmp_path).acquire()


# --- train() and load() against a directory another process writes --------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from lorakit.runlock import RunLock

    with RunLock.hold(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    return _pipeline(tiny_model_dir).with_checkpoints(every=1).train(tmp_path_factory.mktemp("lock") / "run")


@pytest.fixture
def held(finished, tmp_path):
    """A copy of a finished run whose lock another live process holds."""
    run = tmp_path / "held"
    shutil.copytree(finished.output_dir, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        yield run, child.pid
    finally:
        child.kill()
        child.wait()


def test_a_second_train_fails_at_once_naming_the_holder(tiny_model_dir, held, no_weight_load):
    run, pid = held
    for kwargs in ({"overwrite": True}, {"resume": True}):
        started = time.monotonic()
        with pytest.raises(
            RunLockedError, match=rf"{run} is being written by another process \(pid {pid} on"
        ):
            _pipeline(tiny_model_dir).with_checkpoints(every=1).train(run, **kwargs)
        assert time.monotonic() - started < 5
    assert json.loads((run / rundir.LOCK_FILE).read_text())["pid"] == pid  # the holder's lock is untouched
    assert (run / rundir.ADAPTER_WEIGHTS).is_file()  # nothing was moved aside


def test_loading_a_run_in_training_takes_its_last_complete_checkpoint(held):
    run, pid = held
    with pytest.warns(
        UserWarning, match=rf"still being trained \(pid {pid} .*last complete checkpoint, checkpoint-2"
    ):
        model = InferenceModel.load(run)
    assert model.adapters == ["default"]
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ConfigError, match=r"is still being trained .* and has no complete checkpoint yet"):
        InferenceModel.load(run)


def test_the_lock_is_released_when_train_fails(tiny_model_dir, tmp_path, no_weight_load):
    with pytest.raises(ConfigError, match="no complete checkpoint in"):
        _pipeline(tiny_model_dir).train(tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


# --- storage --------------------------------------------------------------------------------------------------


def test_too_little_free_space_fails_before_any_weights_load(
    tiny_model_dir, tmp_path, monkeypatch, no_weight_load
):
    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: real(path)._replace(free=500_000))
    pipeline = _pipeline(tiny_model_dir).with_training(max_steps=20).with_checkpoints(every=2, keep=3)
    with pytest.raises(StorageError) as caught:
        pipeline.train(tmp_path / "run")
    message = str(caught.value)
    assert (
        "the adapter and 5 checkpoint(s) of this run need about" in message
    )  # keep 3 + best + one being written
    assert "but only 0.5 MB are free there" in message and "keep fewer checkpoints" in message


def test_an_unwritable_output_directory_fails_before_any_weights_load(
    tiny_model_dir, tmp_path, no_weight_load
):
    if os.geteuid() == 0:
        target = Path("/sys/lorakit-run")  # root writes everywhere but sysfs
    else:
        tmp_path.chmod(0o500)
        target = tmp_path / "run"
    with pytest.raises(StorageError, match=rf"train\('{target}'\): cannot write to the output directory"):
        _pipeline(tiny_model_dir).train(target)


def test_the_lock_works_where_hard_links_do_not(tmp_path, monkeypatch):
    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")  # e.g. a FUSE-mounted Google Drive

    monkeypatch.setattr(os, "link", no_links)
    with RunLock.hold(tmp_path):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
    assert os.listdir(tmp_path) == []

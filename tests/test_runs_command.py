"""`lorakit runs [DIR]`: one table of the runs under a directory, written here through RunDir (no training)."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.rundir import RunDir, write_json_atomic
from lorakit.tracking.runs import find_runs, run_row, sorted_rows


def _run(path, *, model, r, losses, metrics, quickstart=None):
    run = RunDir(path)
    path.mkdir(parents=True)
    pipeline = {"model": {"name_or_path": model}, "method": {"name": "lora", "r": r}}
    run.write_run({"pipeline": pipeline, "precision": "fp32"})
    for step, loss in enumerate(losses, start=1):
        run.log_metrics(step, {"loss": loss, "learning_rate": 1e-4})
    if metrics is not None:
        run.write_metrics(metrics)
    if quickstart is not None:
        write_json_atomic(run.quickstart_file, quickstart)
    return run


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    _run(
        root / "a-r8", model="smollm2-135m", r=8, losses=[2.0, 1.5],
        metrics={"train_steps": 2, "train_loss": 1.75, "train_runtime": 42.0, "eval_loss": 1.9, "eval_rouge1": 0.31},
    )  # fmt: skip
    _run(
        root / "b-r16", model="smollm2-135m", r=16, losses=[2.0, 1.2, 0.9],
        metrics={"train_steps": 3, "train_loss": 1.37, "train_runtime": 900.0, "eval_loss": 1.4},
        quickstart={"before": 0.0, "after": 0.9},
    )  # fmt: skip
    _run(root / "sweep" / "c-unfinished", model="other", r=4, losses=[3.0], metrics=None)
    # a checkpoint inside a run is not a run of its own
    (root / "b-r16" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (root / "b-r16" / "checkpoints" / "checkpoint-2" / "lorakit_run.json").write_text("{}")
    return root


def test_rows_read_from_the_run_directories(runs_dir):
    rows = {row["name"]: row for row in (run_row(run, runs_dir) for run in find_runs(runs_dir))}
    assert sorted(rows) == ["a-r8", "b-r16", "sweep/c-unfinished"]
    a, b, c = rows["a-r8"], rows["b-r16"], rows["sweep/c-unfinished"]
    assert (a["method"], a["steps"], a["train_loss"], a["eval_loss"], a["metric"]) == (
        "lora r=8",
        2,
        1.5,
        1.9,
        "rouge1 0.31",
    )
    assert (b["train_loss"], b["metric"], b["wall_time"]) == (0.9, "exact_match 0.9", 900.0)
    assert (c["steps"], c["train_loss"], c["eval_loss"], c["date"]) == (None, 3.0, None, None)


def test_lorakit_runs_prints_a_table_sorted_by_a_column(runs_dir, capsys):
    assert main(["runs", str(runs_dir), "--sort", "eval_loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "name",
        "base",
        "model",
        "method",
        "steps",
        "train",
        "loss",
        "eval",
        "loss",
        "metric",
        "wall",
        "time",
        "date",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["b-r16", "a-r8", "sweep/c-unfinished"]
    assert lines[1].split()[:9] == [
        "b-r16",
        "smollm2-135m",
        "lora",
        "r=16",
        "3",
        "0.9000",
        "1.4000",
        "exact_match",
        "0.9",
    ]
    assert "15.0 min" in lines[1] and "42 s" in lines[2] and lines[3].split()[4:7] == ["-", "3.0000", "-"]
    assert main(["runs", str(runs_dir), "--sort", "train_loss", "--reverse"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "sweep/c-unfinished",
        "a-r8",
        "b-r16",
    ]


def test_bad_directory_and_bad_column_are_clear_errors(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"lorakit: error: {tmp_path / 'nope'} is not a directory; pass the directory that holds your runs (e.g. runs/).\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", str(tmp_path), "--sort", "speed"])
    assert exit_info.value.code == 2 and "invalid choice: 'speed'" in capsys.readouterr().err
    assert (
        main(["runs", str(tmp_path)]) == 0
        and capsys.readouterr().out == f"lorakit: no runs under {tmp_path}\n"
    )
    with pytest.raises(ConfigError, match="--sort must be one of name, base_model"):
        sorted_rows([], "speed")

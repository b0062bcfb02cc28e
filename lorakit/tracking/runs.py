"""``lorakit runs [DIR]``: the runs under a directory as one table, to compare experiments without a tracker.

Each run is read through :class:`lorakit.rundir.RunDir` (record, final metrics, metrics log, quickstart
summary); nothing is loaded but JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.rundir import CHECKPOINTS_DIR, RUN_FILE, RunDir, read_json
from lorakit.tracking.report import is_metric

__all__ = ["COLUMNS", "find_runs", "render_runs", "run_row", "sorted_rows"]

COLUMNS = ("name", "base_model", "method", "steps", "train_loss", "eval_loss", "metric", "wall_time", "date")
"""The table's columns, in order; ``--sort`` takes one of them."""
_LOSS_KEYS = ("eval_loss", "eval_perplexity", "eval_mean_token_accuracy")


def find_runs(directory: str | Path) -> list[RunDir]:
    """The run directories under ``directory`` (itself included), checkpoints left out."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; pass the directory that holds your runs (e.g. runs/).")
    found = [RunDir(path.parent) for path in root.rglob(RUN_FILE) if CHECKPOINTS_DIR not in path.parts]
    return sorted(found, key=lambda run: str(run.path))


def _main_metric(run: RunDir, metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The run's headline quality number: the quickstart's held-out exact match, else its first evaluation
    metric besides the loss, else the evaluation perplexity."""
    quick = read_json(run.quickstart_file)
    if isinstance(quick, dict) and "after" in quick:
        return "exact_match", float(quick["after"])
    for key, value in metrics.items():
        if is_metric(key) and key not in _LOSS_KEYS and isinstance(value, (int, float)):
            return key.removeprefix("eval_"), float(value)
    if "eval_perplexity" in metrics:
        return "perplexity", float(metrics["eval_perplexity"])
    return "", None


def run_row(run: RunDir, root: Path) -> dict[str, Any]:
    """One table row of ``run`` (values are None where the run has none, e.g. an unfinished run)."""
    record = run.read_run() or {}
    config = record.get("pipeline") or {}
    method = config.get("method") or {}
    metrics = run.read_metrics()
    losses = [e["loss"] for e in run.read_metrics_log() if isinstance(e.get("loss"), (int, float))]
    name, value = _main_metric(run, metrics)
    finished = run.metrics_file.stat().st_mtime if run.metrics_file.is_file() else None
    return {
        "name": str(run.path.relative_to(root)) if run.path != root else run.path.name,
        "base_model": (config.get("model") or {}).get("name_or_path"),
        "method": " ".join(str(p) for p in (method.get("name"), method.get("r") and f"r={method['r']}") if p),
        "steps": metrics.get("train_steps"),
        "train_loss": losses[-1] if losses else metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "metric": f"{name} {value:.4g}" if value is not None else None,
        "metric_value": value,
        "wall_time": metrics.get("train_runtime"),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(finished)) if finished else None,
    }


def sorted_rows(rows: Sequence[dict[str, Any]], column: str = "date", *, reverse: bool = False) -> list:
    """``rows`` sorted by ``column`` (runs without a value last); ``metric`` sorts by its number."""
    if column not in COLUMNS:
        raise ConfigError(f"--sort must be one of {', '.join(COLUMNS)}; got {column!r}.")
    key = "metric_value" if column == "metric" else column
    present = [row for row in rows if row.get(key) is not None]
    missing = [row for row in rows if row.get(key) is None]
    return sorted(present, key=lambda row: row[key], reverse=reverse) + missing


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "wall_time":
        return f"{float(value):.0f} s" if value < 600 else f"{float(value) / 60:.1f} min"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if len(text) <= 40 else "..." + text[-37:]


def render_runs(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of ``rows``."""
    header = [column.replace("_", " ") for column in COLUMNS]
    body = [[_cell(column, row.get(column)) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in [header, *body]
    ]
    return "\n".join(lines)

"""The end-of-run curve (``curves.png``), Markdown report (``report.md``) and HTML report (``report.html``,
:mod:`lorakit.tracking.html`), from the run directory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lorakit.rundir import (
    CURVES_FILE,
    METRICS_LOG,
    RUN_FILE,
    RunDir,
    atomic_target,
    read_log,
    write_text_atomic,
)
from lorakit.tracking.html import write_report_html
from lorakit.tracking.secrets import redact

__all__ = ["is_metric", "read_log", "write_curves", "write_run_report"]

# Logged eval numbers that are bookkeeping, not quality metrics.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "entropy", "epoch")


def _series(entries: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in entries:
        step = entry.get("step")
        for key, value in entry.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            is_train_loss = key == "loss"
            is_eval = key.startswith("eval_") and not any(word in key for word in _NOT_METRICS)
            if is_train_loss or is_eval:
                series.setdefault(key, []).append((int(step or 0), float(value)))
    return series


def write_curves(output_dir: Path, entries: list[dict[str, Any]] | None = None) -> Path | None:
    """Plot training / eval loss (left) and the other eval metrics (right) to ``curves.png``.

    Needs matplotlib (``pip install 'lorakit[metrics]'``); without it a warning says so and None is returned.
    """
    entries = RunDir(output_dir).read_metrics_log() if entries is None else entries
    series = _series(entries)
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            f"No {CURVES_FILE}: plotting needs matplotlib (pip install 'lorakit[metrics]').", stacklevel=2
        )
        return None
    losses = {k: v for k, v in series.items() if k in ("loss", "eval_loss")}
    rest = {k: v for k, v in series.items() if k not in losses}
    # Scores in [0, 1] (ROUGE, exact match, accuracy) and the rest (BLEU / chrF 0-100, perplexity, custom)
    # get separate panels so neither flattens the other.
    unit = {k: v for k, v in rest.items() if all(0.0 <= value <= 1.0 for _, value in v)}
    other = {k: v for k, v in rest.items() if k not in unit}
    groups = [
        (g, t) for g, t in ((losses, "loss"), (unit, "eval scores (0-1)"), (other, "other eval metrics")) if g
    ]
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for axis, (group, title) in zip(axes[0], groups, strict=True):
        for key, points in group.items():
            steps, values = zip(*points, strict=True)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = RunDir(output_dir).curves_file
    try:
        with atomic_target(path) as tmp:
            figure.savefig(tmp, dpi=100)
    finally:
        plt.close(figure)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_run_report(
    output_dir: Path,
    *,
    pipeline: Any,
    metrics: dict[str, Any],
    data_report: dict[str, Any] | None = None,
    trackers: dict[str, str] | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` (and ``curves.png``): settings, final numbers, evaluation history, samples."""
    run = RunDir(output_dir)
    entries = run.read_metrics_log()
    curves = write_curves(output_dir, entries)
    lines = [f"# lorakit run: {output_dir.name}", "", *_settings(pipeline, data_report)]
    lines += ["", "## Final numbers", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in metrics.items()]
    lines += _evaluations(entries)
    if curves is not None:
        lines += ["", "## Curves", "", f"![loss and metrics]({CURVES_FILE})"]
    lines += _samples(run.read_samples())
    if trackers:
        lines += ["", "## Trackers", ""] + [f"- {name}: {text}" for name, text in trackers.items()]
    lines += ["", f"Every logged step: `{METRICS_LOG}`. Config: `{RUN_FILE}`.", ""]
    path = run.report_file
    write_text_atomic(path, redact("\n".join(lines)))
    write_report_html(output_dir, trackers=trackers)
    return path


def _settings(pipeline: Any, data_report: dict[str, Any] | None) -> list[str]:
    model = pipeline.model.name_or_path if pipeline.model is not None else "?"
    train = pipeline.training
    lines = [
        f"- base model: `{model}`"
        + (f" ({pipeline.quant.method_name})" if pipeline.quant is not None else ""),
        f"- method: {pipeline.resolved_method.describe()}",
        f"- training: lr {train.lr}, batch {train.batch_size} x grad_accum {train.grad_accum}, "
        f"scheduler {train.scheduler}, seed {train.seed}",
    ]
    if data_report:
        lines.append(
            f"- data: {data_report.get('train_rows')} train rows, {data_report.get('val_rows')} validation rows"
        )
    return lines


def is_metric(key: str) -> bool:
    """Whether a logged key is an evaluation quality number (not a timing or token count)."""
    return key.startswith("eval_") and not any(word in key for word in _NOT_METRICS)


def _evaluations(entries: list[dict[str, Any]]) -> list[str]:
    """The last 20 evaluations as a table (an evaluation logs two lines, trainer loss then lorakit's metrics:
    merged per step)."""
    history = [e for e in entries if any(is_metric(k) for k in e)]
    if not history:
        return []
    keys = sorted({k for e in history for k in e if is_metric(k)})
    merged: dict[Any, dict[str, Any]] = {}
    for entry in history:
        merged.setdefault(entry.get("step"), {}).update(entry)
    lines = ["", "## Evaluations", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for step, entry in list(merged.items())[-20:]:
        lines.append(f"| {step} | " + " | ".join(_fmt(entry.get(k, "")) for k in keys) + " |")
    return lines


def _samples(samples: list[dict[str, Any]]) -> list[str]:
    """The generation samples of the last step that logged any."""
    if not samples:
        return []
    last = max(s.get("step", 0) for s in samples)
    lines = ["", f"## Samples at step {last}", ""]
    for sample in (s for s in samples if s.get("step") == last):
        prompt = str(sample.get("prompt", "")).strip().replace("\n", " ")
        lines.append(f"- `{prompt[-100:]}` -> {str(sample.get('generation', ''))[:200]!r}")
    return lines

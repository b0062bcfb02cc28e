"""The end-of-run curve (``curves.png``) and Markdown report (``report.md``), from ``metrics.jsonl``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

__all__ = ["read_log", "write_curves", "write_run_report"]

CURVES_FILE = "curves.png"
REPORT_FILE = "report.md"
# Logged eval numbers that are bookkeeping, not quality metrics.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "entropy", "epoch")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    entries = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


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
    entries = read_log(output_dir / "metrics.jsonl") if entries is None else entries
    series = _series(entries)
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "No curves.png: plotting needs matplotlib (pip install 'lorakit[metrics]').", stacklevel=2
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
    path = output_dir / CURVES_FILE
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
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
    """Write ``report.md`` (and ``curves.png``): settings, final numbers, evaluation history, samples."""
    from lorakit.tracking import SAMPLES_LOG, redact

    entries = read_log(output_dir / "metrics.jsonl")
    curves = write_curves(output_dir, entries)
    model = pipeline.model.name_or_path if pipeline.model is not None else "?"
    method = pipeline.resolved_method.describe()
    train = pipeline.training
    lines = [
        f"# lorakit run: {output_dir.name}",
        "",
        f"- base model: `{model}`"
        + (f" ({pipeline.quant.method_name})" if pipeline.quant is not None else ""),
        f"- method: {method}",
        f"- training: lr {train.lr}, batch {train.batch_size} x grad_accum {train.grad_accum}, "
        f"scheduler {train.scheduler}, seed {train.seed}",
    ]
    if data_report:
        lines.append(
            f"- data: {data_report.get('train_rows')} train rows, {data_report.get('val_rows')} validation rows"
        )
    lines += ["", "## Final numbers", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in metrics.items()]

    def is_metric(key: str) -> bool:
        return key.startswith("eval_") and not any(word in key for word in _NOT_METRICS)

    history = [e for e in entries if any(is_metric(k) for k in e)]
    if history:
        keys = sorted({k for e in history for k in e if is_metric(k)})
        # An evaluation logs its numbers in two lines (trainer loss, then lorakit's metrics): merge per step.
        merged: dict[Any, dict[str, Any]] = {}
        for entry in history:
            merged.setdefault(entry.get("step"), {}).update(entry)
        lines += [
            "",
            "## Evaluations",
            "",
            "| step | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for step, entry in list(merged.items())[-20:]:
            lines.append(f"| {step} | " + " | ".join(_fmt(entry.get(k, "")) for k in keys) + " |")
    if curves is not None:
        lines += ["", "## Curves", "", f"![loss and metrics]({CURVES_FILE})"]
    samples_path = output_dir / SAMPLES_LOG
    if samples_path.is_file():
        samples = read_log(samples_path)
        if samples:
            last = max(s.get("step", 0) for s in samples)
            lines += ["", f"## Samples at step {last}", ""]
            for sample in (s for s in samples if s.get("step") == last):
                prompt = str(sample.get("prompt", "")).strip().replace("\n", " ")
                lines.append(f"- `{prompt[-100:]}` -> {str(sample.get('generation', ''))[:200]!r}")
    if trackers:
        lines += ["", "## Trackers", ""] + [f"- {name}: {text}" for name, text in trackers.items()]
    lines += ["", "Every logged step: `metrics.jsonl`. Config: `lorakit_run.json`.", ""]
    path = output_dir / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(redact("\n".join(lines)))
    tmp.replace(path)
    return path

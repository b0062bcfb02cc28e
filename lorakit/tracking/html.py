"""``report.html``: one self-contained page per run (inline SVG charts, inline CSS, no script, no network).

Sections: the plan, the final metrics, loss / evaluation / learning-rate curves, the token-length histogram
with the truncation cut, three training examples with the trained tokens highlighted, the logged generation
samples, and the before/after table of a quickstart run. Everything is read from the run directory through
:class:`lorakit.rundir.RunDir` (the record's ``report_data`` holds the lengths and examples, written at the end
of training by :func:`report_data`), so ``lorakit report RUN`` rebuilds the page without loading a model.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.data.preview import preview_examples
from lorakit.rundir import METRICS_LOG, RUN_FILE, RunDir, read_json, write_text_atomic
from lorakit.tracking.secrets import redact

__all__ = ["report_data", "summary_html", "write_report_html"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "entropy", "epoch")
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
    "vertical-align:top}th{background:#f3f3f3}pre{white-space:pre-wrap;background:#fafafa;border:1px solid "
    "#eee;padding:.5em}mark{background:#b7f0b1}svg{background:#fff;margin:.3em}h2{border-bottom:1px solid #ddd}"
)
_BINS = 30


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- data written at the end of training ------------------------------------------------------------------


def report_data(prepared: Any, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """The token-length histogram and three examples (text pieces, trained or not) for the report."""
    columns = prepared.train.column_names
    if "input_ids" not in columns:  # preference rows: prompt + reply ids, no SFT labels to highlight
        return _preference_report_data(prepared, columns, max_length)
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    rows = [prepared.train[index] for index in range(min(3, len(prepared.train)))]
    examples = preview_examples(rows, tokenizer).examples if rows else ()
    return {
        "lengths": _histogram(lengths, max_length, int(getattr(prepared.report, "truncated", 0))),
        "examples": [
            {
                "pieces": [[text, trained] for text, trained in ex.pieces],
                "tokens": ex.n_tokens,
                "trained": ex.n_trained,
            }
            for ex in examples
        ],
    }


def _histogram(lengths: list[int], max_length: int | None, truncated: int) -> dict[str, Any]:
    """Token lengths in about ``_BINS`` bins, with the ``max_length`` cut."""
    top = max(max(lengths, default=1), max_length or 0, 1)
    width = max(1, -(-top // _BINS))
    counts = [0] * (top // width + 1)
    for length in lengths:
        counts[length // width] += 1
    return {
        "bin_width": width,
        "counts": counts,
        "max_length": max_length,
        "truncated": truncated,
        "rows": len(lengths),
    }


def _preference_report_data(prepared: Any, columns: list[str], max_length: int | None) -> dict[str, Any]:
    """Preference rows: the length of prompt + chosen (paired) or prompt + completion (KTO); no examples (the
    run's ``preview()`` shows chosen and rejected with the scored tokens)."""
    reply = "chosen_ids" if "chosen_ids" in columns else "completion_ids"
    lengths = [
        len(prompt) + len(answer)
        for prompt, answer in zip(prepared.train["prompt_ids"], prepared.train[reply], strict=True)
    ]
    return {"lengths": _histogram(lengths, max_length, 0), "examples": []}


# --- SVG charts ---------------------------------------------------------------------------------------------


def _scale(low: float, high: float, start: float, end: float) -> Any:
    span = (high - low) or 1.0
    return lambda value: start + (value - low) / span * (end - start)


def _axes(x0: float, x1: float, y0: float, y1: float, size: tuple[int, int], labels: tuple[str, str]) -> str:
    width, height = size
    parts = [
        f"<line x1='50' y1='{height - 30}' x2='{width - 10}' y2='{height - 30}' stroke='#444'/>",
        f"<line x1='50' y1='10' x2='50' y2='{height - 30}' stroke='#444'/>",
        f"<text x='50' y='{height - 12}' font-size='11'>{_esc(_fmt(x0))}</text>",
        f"<text x='{width - 10}' y='{height - 12}' font-size='11' text-anchor='end'>{_esc(_fmt(x1))}</text>",
        f"<text x='{width / 2}' y='{height - 2}' font-size='11' text-anchor='middle'>{_esc(labels[0])}</text>",
        f"<text x='46' y='{height - 32}' font-size='11' text-anchor='end'>{_esc(_fmt(y0))}</text>",
        f"<text x='46' y='20' font-size='11' text-anchor='end'>{_esc(_fmt(y1))}</text>",
        f"<text x='12' y='{height / 2}' font-size='11' transform='rotate(-90 12 {height / 2})' "
        f"text-anchor='middle'>{_esc(labels[1])}</text>",
    ]
    return "".join(parts)


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    ylabel: str,
    size: tuple[int, int] = (460, 260),
) -> str:
    """An inline SVG line chart of ``{name: [(step, value), ...]}`` with a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    width, height = size
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_of = _scale(min(xs), max(xs), 55, width - 15)
    y_of = _scale(min(ys), max(ys), height - 35, 15)
    body = [_axes(min(xs), max(xs), min(ys), max(ys), size, ("step", ylabel))]
    for index, (name, values) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        path = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in values)
        body.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>")
        body += [f"<circle cx='{x_of(x):.1f}' cy='{y_of(y):.1f}' r='2.5' fill='{color}'/>" for x, y in values]
        body.append(
            f"<text x='{width - 15}' y='{16 + 14 * index}' font-size='11' fill='{color}' "
            f"text-anchor='end'>{_esc(name)}</text>"
        )
    return (
        f"<svg width='{width}' height='{height}' role='img'><title>{_esc(title)}</title>{''.join(body)}</svg>"
    )


def histogram_chart(lengths: dict[str, Any], size: tuple[int, int] = (460, 260)) -> str:
    """An inline SVG histogram of tokens per training example, with the ``max_length`` cut as a red line."""
    counts, width_bin = lengths.get("counts") or [], int(lengths.get("bin_width") or 1)
    if not counts:
        return ""
    width, height = size
    top = len(counts) * width_bin
    x_of = _scale(0, top, 55, width - 15)
    y_of = _scale(0, max(counts), height - 35, 15)
    body = [_axes(0, top, 0, max(counts), size, ("tokens per example", "examples"))]
    for index, count in enumerate(counts):
        x, right = x_of(index * width_bin), x_of((index + 1) * width_bin)
        body.append(
            f"<rect x='{x:.1f}' y='{y_of(count):.1f}' width='{max(right - x - 1, 1):.1f}' "
            f"height='{y_of(0) - y_of(count):.1f}' fill='#1f77b4'/>"
        )
    cut = lengths.get("max_length")
    if cut:
        body.append(
            f"<line x1='{x_of(cut):.1f}' y1='12' x2='{x_of(cut):.1f}' y2='{height - 30}' stroke='#d62728' "
            f"stroke-dasharray='4 3' stroke-width='2'/><text x='{x_of(cut) - 4:.1f}' y='22' font-size='11' "
            f"fill='#d62728' text-anchor='end'>max_length {cut}</text>"
        )
    return (
        f"<svg width='{width}' height='{height}' role='img'><title>token lengths</title>{''.join(body)}</svg>"
    )


# --- sections -----------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(key: str, title: str, body: str) -> str:
    return f"<section id='{key}'><h2>{_esc(title)}</h2>{body}</section>" if body else ""


def _plan(record: dict[str, Any]) -> str:
    config = redact(record.get("pipeline") or {})
    model, method = config.get("model") or {}, config.get("method") or {}
    training, data = config.get("training") or {}, config.get("data") or {}
    report = record.get("data_report") or {}
    quant = (config.get("quant") or {}).get("name") or ("on" if config.get("quant") else "none")
    rows = [
        ("base model", model.get("name_or_path")),
        ("method", ", ".join(f"{k}={v}" for k, v in method.items() if v not in (None, False, []))),
        ("quantization", quant),
        ("precision", record.get("precision")),
        ("template", (record.get("template") or {}).get("name", data.get("template"))),
        ("data", f"{report.get('train_rows')} train / {report.get('val_rows')} validation rows"),
        ("tokens", f"{report.get('train_tokens')} train tokens, {report.get('trained_tokens')} trained"),
        ("max_length", f"{data.get('max_length')} ({report.get('truncated', 0)} rows cut)"),
    ]
    rows += [(f"training.{key}", value) for key, value in training.items() if value is not None]
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    return _table(("setting", "value"), rows) + (f"<p>versions: {_esc(versions)}</p>" if versions else "")


def _curves(entries: list[dict[str, Any]]) -> str:
    """Loss, evaluation metrics and learning rate, each a chart."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in entries:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                series.setdefault(key, []).append((float(entry.get("step") or 0), float(value)))
    losses = {k: v for k, v in series.items() if k in ("loss", "eval_loss")}
    metrics = {
        k: v
        for k, v in series.items()
        if k.startswith("eval_") and k != "eval_loss" and not any(w in k for w in _NOT_METRICS)
    }
    charts = [
        line_chart(losses, "loss", "loss"),
        line_chart(metrics, "evaluation metrics", "value"),
        line_chart({"learning_rate": series.get("learning_rate", [])}, "learning rate", "learning rate"),
    ]
    return "".join(chart for chart in charts if chart)


def _lengths(data: dict[str, Any]) -> str:
    lengths = data.get("lengths") or {}
    chart = histogram_chart(lengths)
    if not chart:
        return ""
    note = (
        f"<p>{lengths.get('rows')} training examples; {lengths.get('truncated', 0)} rows (training and "
        f"validation) were cut at max_length {lengths.get('max_length')} (the red line).</p>"
    )
    return note + chart


def _examples(data: dict[str, Any]) -> str:
    blocks = []
    for index, example in enumerate(data.get("examples") or []):
        body = "".join(
            f"<mark>{_esc(text)}</mark>" if trained else _esc(text) for text, trained in example["pieces"]
        )
        blocks.append(
            f"<p><b>example {index}</b>: {example['tokens']} tokens, {example['trained']} trained "
            f"(highlighted)</p><pre>{body}</pre>"
        )
    return "".join(blocks)


def _samples(samples: list[dict[str, Any]]) -> str:
    rows = [(s.get("step"), s.get("prompt", ""), s.get("generation", "")) for s in samples[-30:]]
    return _table(("step", "prompt", "generation"), rows) if rows else ""


def _before_after(summary: dict[str, Any] | None) -> str:
    if not summary or "before" not in summary:
        return ""
    rows = [("held-out exact match", f"{100 * summary['before']:.1f}%", f"{100 * summary['after']:.1f}%")]
    return _table(("metric", "before (base model)", "after (fine-tuned)"), rows) + (
        f"<p>{summary.get('test_rows')} held-out rows.</p>"
    )


def _metrics(metrics: dict[str, Any]) -> str:
    return _table(("metric", "value"), list(metrics.items())) if metrics else ""


def summary_html(output_dir: str | Path) -> str:
    """The run's summary (plan, metrics, curves) as an HTML fragment: ``TrainResult._repr_html_``."""
    run = RunDir(Path(output_dir))
    record = (run.read_run() if run.is_run() else None) or {}
    parts = [
        f"<div class='lorakit-run'><h3>lorakit run {_esc(run.path.name)}</h3>",
        _section("metrics", "Final metrics", _metrics(run.read_metrics())),
        _section("curves", "Curves", _curves(run.read_metrics_log())),
        _section("plan", "Plan", _plan(record)),
        f"<p>Full report: {_esc(run.report_html_file)}</p></div>",
    ]
    return redact("".join(parts))


def write_report_html(output_dir: str | Path, *, trackers: dict[str, str] | None = None) -> Path:
    """Write (or rebuild) ``report.html`` from what the run directory holds; returns its path."""
    run = RunDir(Path(output_dir))
    record = (run.read_run() if run.is_run() else None) or {}
    data = record.get("report_data") or {}
    sections = [
        _section("plan", "Plan", _plan(record)),
        _section("metrics", "Final metrics", _metrics(run.read_metrics())),
        _section("before-after", "Before / after", _before_after(read_json(run.quickstart_file))),
        _section("curves", "Loss, evaluation and learning-rate curves", _curves(run.read_metrics_log())),
        _section("lengths", "Tokens per example", _lengths(data)),
        _section("examples", "Training examples (trained tokens highlighted)", _examples(data)),
        _section("samples", "Generation samples", _samples(run.read_samples())),
        _section("trackers", "Trackers", _table(("tracker", "where"), list((trackers or {}).items()))
                 if trackers else ""),
    ]  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lorakit run {_esc(run.path.name)}"
        f"</title><style>{_CSS}</style></head><body><h1>lorakit run {_esc(run.path.name)}</h1>"
        f"<p>{_esc(run.path)} &middot; written {stamp} &middot; every logged step: {METRICS_LOG}, "
        f"config: {RUN_FILE}</p>{''.join(sections)}</body></html>\n"
    )
    path = run.report_html_file
    write_text_atomic(path, redact(page))
    return path

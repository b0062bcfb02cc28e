"""The main job on the embedded default: fine-tune SmolLM2-135M to route support tickets, and show the result.

Runs offline on a CPU in a few minutes: measures exact-match accuracy on held-out tickets (written with other
wording than the training tickets) before and after a short LoRA run, prints the table, and one generation.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import attrs

from lorakit.evaluation import EvalResult, compare, evaluate
from lorakit.inference import InferenceModel
from lorakit.metrics.builtin import ExactMatch
from lorakit.pipeline import Pipeline
from lorakit.rundir import RunDir, write_json_atomic
from lorakit.tracking.html import write_report_html

__all__ = ["exact_match", "run_quickstart", "sample_path"]

SAMPLE = "support_tickets"


def sample_path(split: str) -> Path:
    """Path of a bundled sample split (``"train"`` or ``"test"``)."""
    return Path(str(files("lorakit") / "samples" / f"{SAMPLE}_{split}.jsonl"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _evaluate(model: Any, rows: list[dict[str, Any]], name: str, *, batch_size: int = 16) -> EvalResult:
    """``lorakit.evaluate`` with the quickstart's metric: exact match of the answer's first line (case and
    surrounding punctuation ignored)."""
    return evaluate(
        model, rows, metrics=[ExactMatch(first_line=True)], max_new_tokens=8, batch_size=batch_size, name=name
    )


def exact_match(model: Any, rows: list[dict[str, Any]], *, batch_size: int = 16) -> tuple[float, list[str]]:
    """Share of rows whose generated answer (first line, case-insensitive) equals ``output``."""
    result = _evaluate(model, rows, "model", batch_size=batch_size)
    return result.metrics["exact_match"], list(result.predictions)


def run_quickstart(
    output_dir: str | Path = "runs/quickstart",
    *,
    model: str = "smollm2-135m",
    max_steps: int = 100,
    template: str = "chatml",
    eval_rows: int | None = None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Fine-tune, measure before/after, print the table; returns the numbers."""
    test_rows = _read_jsonl(sample_path("test"))
    if eval_rows is not None:
        test_rows = test_rows[:eval_rows]
    pipeline = (
        Pipeline.from_model(model)
        .with_lora(r=16, alpha=32, targets="all-linear")
        .with_dataset(str(sample_path("train")), template=template, val_split=0.1, max_length=256)
        .with_training(
            max_steps=max_steps, lr=4e-4, batch_size=8, scheduler="linear", warmup_ratio=0.1, logging_steps=10
        )
    )
    print(f"\n[1/3] zero-shot exact match of {model} on {len(test_rows)} held-out tickets ...", flush=True)
    base = InferenceModel.from_model(model, template=template)
    before_result = _evaluate(base, test_rows, f"{model} (base)")
    before = before_result.metrics["exact_match"]
    del base

    print(f"[2/3] LoRA fine-tuning for {max_steps} steps on the CPU ...", flush=True)
    started = time.perf_counter()
    result = pipeline.train(output_dir, overwrite=overwrite)
    minutes = (time.perf_counter() - started) / 60

    print("[3/3] exact match after fine-tuning ...", flush=True)
    tuned = InferenceModel.load(result.output_dir)
    after_result = _evaluate(tuned, test_rows, f"{model} + LoRA")
    after = after_result.metrics["exact_match"]

    _print_results(result, test_rows, minutes, before_result, after_result)
    summary = {
        "before": before,
        "after": after,
        "minutes": minutes,
        "test_rows": len(test_rows),
        "metrics": result.metrics,
        "output_dir": str(result.output_dir),
    }
    write_json_atomic(RunDir(result.output_dir).quickstart_file, summary)
    report = write_report_html(result.output_dir)  # again, now with the before/after table
    print(f"  report: {report}")
    return summary


def _print_results(
    result: Any, test_rows: list[dict[str, Any]], minutes: float, before: EvalResult, after: EvalResult
) -> None:
    """The data and training summary, the before/after table and one example answer."""
    report = result.data_report
    print()
    print(
        f"  data: {report.get('train_rows')} train rows, {report.get('val_rows')} validation rows, "
        f"{len(test_rows)} held-out test rows"
    )
    print(
        f"  training: {result.metrics['train_steps']} steps in {minutes:.1f} min, "
        f"train loss {result.metrics['train_loss']:.3f}"
        + (f", eval loss {result.metrics['eval_loss']:.3f}" if "eval_loss" in result.metrics else "")
    )
    print()
    # The training time goes into the table too: it is the quickstart's other headline number.
    timed = attrs.evolve(after, metrics={**after.metrics, "training_minutes": round(minutes, 2)})
    table = compare(
        before, timed, metrics={"exact_match": "held-out exact match", "training_minutes": "training (min)"}
    )
    print("  " + table.replace("\n", "\n  "))
    example = test_rows[0]
    print(f"\n  example ticket: {example['input']}")
    print(f"  model answer:   {after.predictions[0]!r}   (expected {example['output']!r})")
    print(
        f"\n  adapter saved in {result.output_dir}; load it with lk.InferenceModel.load({str(result.output_dir)!r})"
    )

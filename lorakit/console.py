"""What a training run prints: a short plan summary, one progress display, evaluation lines, a final summary.

:class:`TrainingConsole` is a ``TrainerCallback`` that replaces transformers' ``ProgressCallback`` /
``PrinterCallback`` / ``NotebookProgressCallback`` (:func:`remove_default_printers`), so the Trainer's raw log
dicts never reach the console. Where output is a terminal or a notebook it shows one live tqdm bar (step,
loss, learning rate, tokens/s, ETA) and writes evaluation lines above it; elsewhere (a log file, CI, or
``LORAKIT_PROGRESS=0``) it prints one plain line about every tenth of the run, so a 30-step run fits in about
40 lines.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from lorakit.progress import progress_enabled
from lorakit.tracking.report import is_metric

__all__ = [
    "TrainingConsole",
    "final_summary",
    "live_output",
    "plan_summary",
    "remove_default_printers",
]

# transformers' own printers: the tqdm bar, the raw-dict printer and the notebook table.
_DEFAULT_PRINTERS = ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback")


def _in_notebook() -> bool:
    """True inside a Jupyter / Colab kernel (where a widget bar renders), False in a plain Python or IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ in ("ZMQInteractiveShell", "Shell")


def live_output(stream: TextIO | None = None) -> bool:
    """Whether a live bar fits: progress on (``LORAKIT_PROGRESS`` not ``0``) and a terminal or a notebook."""
    if not progress_enabled():
        return False
    stream = stream or sys.stdout
    return _in_notebook() or bool(getattr(stream, "isatty", lambda: False)())


def remove_default_printers(trainer: Any) -> None:
    """Take transformers' progress bar / dict printer off ``trainer`` (the console replaces them)."""
    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if type(cb).__name__ not in _DEFAULT_PRINTERS]


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def plan_summary(
    output_dir: Path,
    *,
    model: str,
    method: str,
    trainable: int,
    total: int,
    rows: tuple[int, int],
    steps: int,
    batch: tuple[int, int],
    precision: str,
    device: str,
    memory: str | None,
) -> str:
    """The few lines printed when a run starts: model, method, trainable parameters, rows, steps, precision,
    memory estimate."""
    share = 100 * trainable / total if total else 0.0
    lines = [
        f"lorakit train -> {output_dir}",
        f"  model       {model}",
        f"  method      {method}",
        f"  parameters  {trainable:,} trainable / {total:,} total ({share:.3f}%)",
        f"  data        {rows[0]:,} train / {rows[1]:,} validation rows; {steps} steps "
        f"(batch {batch[0]} x grad_accum {batch[1]})",
        f"  precision   {precision} on {device}" + (f"; memory ~{memory} (estimate)" if memory else ""),
    ]
    return "\n".join(lines)


def final_summary(metrics: dict[str, Any], output_dir: Path, report: Path | None) -> str:
    """The lines printed when a run ends: final losses, tokens/s, wall time, where the adapter and report are."""
    runtime = float(metrics.get("train_runtime", 0.0))
    head = (
        f"lorakit done: {int(metrics.get('train_steps', 0))} steps in {_clock(runtime)} ({runtime:.1f} s), "
        f"{int(metrics.get('train_tokens', 0)):,} tokens, {float(metrics.get('train_tokens_per_second', 0)):,.0f} "
        "tokens/s"
    )
    losses = [f"train loss {float(metrics['train_loss']):.4f}"] if "train_loss" in metrics else []
    if "eval_loss" in metrics:
        losses.append(f"eval loss {float(metrics['eval_loss']):.4f}")
    if "eval_perplexity" in metrics:
        losses.append(f"perplexity {float(metrics['eval_perplexity']):.4g}")
    lines = [head]
    if losses:
        lines.append("  " + ", ".join(losses))
    lines.append(f"  adapter  {output_dir}")
    if report is not None:
        lines.append(f"  report   {report}")
    return "\n".join(lines)


def _eval_text(logs: dict[str, Any]) -> str:
    shown = [
        (key, value) for key, value in logs.items() if is_metric(key) and isinstance(value, (int, float))
    ]
    return "  ".join(f"{key} {value:.4g}" for key, value in shown)


class TrainingConsole(TrainerCallback):
    """The progress display of one run (main process only); see the module docstring."""

    def __init__(self, total_steps: int, *, live: bool | None = None, stream: TextIO | None = None) -> None:
        self.total_steps = max(int(total_steps), 1)
        self._stream = stream
        self.live = live_output(stream) if live is None else live
        self.every = max(1, math.ceil(self.total_steps / 10))
        self.bar: Any = None
        self._started = 0.0
        self._last_printed = self._first_step = 0
        self._last_tokens: tuple[float, float] | None = None  # (time, num_tokens) at the last log
        self._tokens_per_second: float | None = None
        self._ended = False  # evaluations after training are the run's final evaluation

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout  # resolved late, so a redirected / captured stdout is honoured

    def print(self, text: str) -> None:
        """A line above the live bar, or a plain line."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._started = time.perf_counter()
        self._last_printed = self._first_step = int(state.global_step)
        if self.live:
            if _in_notebook():
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(
                total=self.total_steps, initial=int(state.global_step), unit="step", dynamic_ncols=True,
                file=self.stream, desc="lorakit",
            )  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(int(state.global_step) - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        step = int(state.global_step)
        if "loss" in logs:
            self._train_log(step, logs)
        evaluated = _eval_text(logs)
        if evaluated:
            label = (
                "final eval"
                if self._ended
                else f"eval  step {step:>{len(str(self.total_steps))}}/{self.total_steps}"
            )
            self.print(f"{label}  {evaluated}")

    def _train_log(self, step: int, logs: dict[str, Any]) -> None:
        now, tokens = time.perf_counter(), logs.get("num_tokens")
        if isinstance(tokens, (int, float)):
            if self._last_tokens is not None and now > self._last_tokens[0]:
                seen = (tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
                self._tokens_per_second = seen if seen >= 0 else None
            elif self._last_tokens is None and now > self._started:
                self._tokens_per_second = tokens / (now - self._started)
            self._last_tokens = (now, float(tokens))
        parts = [f"loss {float(logs['loss']):.4f}"]
        if isinstance(logs.get("learning_rate"), (int, float)):
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        if self._tokens_per_second is not None:
            parts.append(f"{self._tokens_per_second:,.0f} tok/s")
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(parts), refresh=True)
            return
        if step - self._last_printed < self.every and step < self.total_steps:
            return
        self._last_printed = step
        elapsed = now - self._started
        eta = elapsed / max(step - self._first_step, 1) * (self.total_steps - step)
        width = len(str(self.total_steps))
        parts.append(f"{_clock(elapsed)} elapsed, eta {_clock(eta)}")
        self.print(f"step  {step:>{width}}/{self.total_steps}  " + "  ".join(parts))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._ended = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None

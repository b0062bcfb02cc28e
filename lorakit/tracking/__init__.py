"""Where a run's numbers go: ``metrics.jsonl`` always, and TensorBoard or W&B when chosen.

W&B needs no account: logged in by any of W&B's own means (``wandb.login()`` / ``wandb login``, a netrc
entry, ``WANDB_API_KEY``) it runs online; otherwise offline, writing ``<run>/wandb/offline-run-*``, which
``wandb sync <that directory>`` uploads later. :func:`wandb_mode` decides and says so in one line. At the end of training :func:`write_run_report` adds a
loss / metric curve (``curves.png``) and a short ``report.md`` to the run directory. Secrets (API keys,
tokens) are never written: track() refuses secret-looking options, and every config written here goes
through :func:`redact`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.rundir import SAMPLES_LOG, RunDir
from lorakit.tracking.html import report_data, summary_html, write_report_html
from lorakit.tracking.report import write_curves, write_run_report
from lorakit.tracking.secrets import redact, secret_values

__all__ = [
    "SAMPLES_LOG",
    "Tracker",
    "redact",
    "report_data",
    "secret_values",
    "summary_html",
    "wandb_mode",
    "write_curves",
    "write_report_html",
    "write_run_report",
]


def _tracked_config(pipeline: Any) -> dict[str, Any]:
    """The pipeline's config as trackers get it: in-memory data described, not dumped."""
    config = pipeline.to_config()
    if config.get("data"):
        config["data"]["source"] = _describe_source(pipeline.data.source)
        if config["data"].get("val") is not None:
            config["data"]["val"] = _describe_source(pipeline.data.val)
    return config


def wandb_mode(requested: str | None = None) -> tuple[str, str]:
    """The W&B mode of a run and the line that says why: ``track("wandb", mode=...)`` when given, else
    ``"online"`` when W&B finds credentials by its own means (``WANDB_API_KEY``, a netrc entry written by
    ``wandb login``, an earlier ``wandb.login()`` in this process), else ``"offline"``.

    Credentials are looked up with ``wandb.login(prompt=False, verify=False)``, silenced: no prompt, no network.
    """
    if requested:
        return requested, f"lorakit: W&B {requested} (track('wandb', mode={requested!r}))"
    if os.environ.get("WANDB_API_KEY") or _wandb_logged_in():
        return "online", "lorakit: W&B online (logged in)"
    return "offline", (
        "lorakit: W&B offline (not logged in: `wandb login` or WANDB_API_KEY to upload; "
        "`wandb sync <run>/wandb/offline-run-*` uploads this run later)"
    )


def _wandb_logged_in() -> bool:
    """``wandb.login(prompt=False, verify=False)`` with W&B's ``silent`` setting on for the call. Not silenced,
    a login that finds credentials prints the user's name, which W&B asks its server for: without a network
    that waits for a timeout (5 s per call with W&B 0.31, longer where connections hang)."""
    import wandb

    try:
        from wandb.sdk import wandb_setup

        settings = wandb_setup.singleton().settings
        previous = settings.silent
    except (ImportError, AttributeError):  # another W&B layout: its documented call
        return bool(wandb.login(prompt=False, verify=False))
    settings.silent = True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    finally:
        settings.silent = previous


def _describe_source(source: Any) -> Any:
    if isinstance(source, str):
        return source
    return f"<{type(source).__name__} with {len(source)} rows>"


class Tracker:
    """The run's tracker: trainer callbacks for the backend, sample logging, and where things were written."""

    def __init__(self, pipeline: Any, output_dir: Path, *, active: bool = True) -> None:
        # Only the main process of a multi-process run tracks (and writes); the others get an inert tracker.
        self.backend = pipeline.tracking.backend if active else "none"
        self.active = active
        self.output_dir = output_dir
        self.run = RunDir(output_dir)
        self.callbacks: list[Any] = []
        self.writer: Any = None
        self.wandb: Any = None
        self.wandb_dir: Path | None = None
        self.wandb_mode: str | None = None
        self._close: Callable[[], None] = lambda: None
        self.mlflow: Any = None
        options = pipeline.tracking.option_dict
        backends = self.backend.split("+")  # e.g. "tensorboard+mlflow": several trackers at once
        if "mlflow" in backends:
            from lorakit.tracking.mlflow import MLFLOW_OPTIONS, MlflowTracker

            mlflow_options = {key: options.pop(key) for key in MLFLOW_OPTIONS if key in options}
            self.mlflow = MlflowTracker(_tracked_config(pipeline), output_dir, mlflow_options)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            self.writer = SummaryWriter(log_dir=str(self.run.tensorboard_dir))
            self.callbacks = [TensorBoardCallback(tb_writer=self.writer)]
            self._close = self.writer.close
        elif "wandb" in backends:
            import wandb
            from transformers.integrations import WandbCallback

            mode, line = wandb_mode(options.pop("mode", None))
            print(line, flush=True)
            run = wandb.init(
                dir=str(output_dir),
                mode=mode,  # type: ignore[arg-type]
                config=redact(_tracked_config(pipeline)),
                save_code=False,
                settings=wandb.Settings(disable_git=True, x_save_requirements=False),
                **redact(options),  # notes, tags, names: what W&B writes locally and uploads
            )
            self.wandb, self.wandb_mode = wandb, mode
            self.wandb_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
            self.callbacks = [WandbCallback()]
            self._close = wandb.finish
        if self.mlflow is not None:
            self.callbacks.append(self.mlflow.callback)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Generation samples: appended to ``samples.jsonl``, printed, and sent to TensorBoard / W&B."""
        if not self.active:
            return
        self.run.log_samples([redact(row) for row in rows])
        shown = "\n".join(f"  [{r['step']}] {r['prompt'][-60:]!r} -> {r['generation'][:120]!r}" for r in rows)
        print(f"lorakit samples at step {step}:\n{shown}", flush=True)
        if self.writer is not None:
            table = "| prompt | generation |\n|---|---|\n" + "\n".join(
                f"| {_md(r['prompt'])} | {_md(r['generation'])} |" for r in rows
            )
            self.writer.add_text("samples", table, global_step=step)
            self.writer.flush()
        if self.wandb is not None and self.wandb.run is not None:
            table = self.wandb.Table(columns=["step", "prompt", "generation"])
            for row in rows:
                table.add_data(row["step"], row["prompt"], row["generation"])
            self.wandb.log({"samples": table, "train/global_step": step})

    def log_artifacts(self, output_dir: Path) -> None:
        """At the end of a run: the report and the adapter to the trackers that keep files (MLflow)."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(output_dir)

    def describe(self) -> dict[str, str]:
        """Where the tracker wrote, for the run report."""
        found = {}
        if self.mlflow is not None:
            found["mlflow"] = (
                f"run {self.mlflow.run_id} in experiment {self.mlflow.experiment_id} "
                f"({self.mlflow.client.tracking_uri})"
            )
        return {**found, **self._describe()}

    def _describe(self) -> dict[str, str]:
        backends = self.backend.split("+")
        if "tensorboard" in backends:
            return {"tensorboard": f"tensorboard --logdir {self.run.tensorboard_dir}"}
        if "wandb" in backends and self.wandb_dir is not None:
            if self.wandb_mode == "offline":
                return {
                    "wandb": f"offline run in {self.wandb_dir}; upload it with `wandb sync {self.wandb_dir}`"
                }
            return {"wandb": f"run directory {self.wandb_dir} ({self.wandb_mode})"}
        return {}

    def close(self) -> None:
        self._close()
        self._close = lambda: None
        if self.mlflow is not None and not self.mlflow.closed:
            self.mlflow.close()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")

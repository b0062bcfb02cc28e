"""``track("mlflow")``: the run's config, metrics per step, report and adapter in MLflow, through ``MlflowClient``.

The tracking store is MLflow's own choice: ``MLFLOW_TRACKING_URI`` (e.g. ``sqlite:///mlflow.db`` or a server),
else ``track("mlflow", tracking_uri=...)``, else MLflow's default. Options: ``experiment`` (default
``"lorakit"``), ``run_name`` (default: the run directory's name), ``tracking_uri``, ``artifact_location`` (used
when the experiment is created). lorakit uses the client with an explicit run id, never MLflow's global
"active run", so a user's own ``mlflow.start_run()`` is untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorakit import __version__
from lorakit.errors import MissingDependencyError
from lorakit.noise import quiet_logger
from lorakit.rundir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CURVES_FILE,
    METRICS_FILE,
    REPORT_FILE,
    REPORT_HTML,
    RUN_FILE,
    TEMPLATE_FILE,
)
from lorakit.tracking.secrets import redact

__all__ = ["MLFLOW_OPTIONS", "MlflowTracker", "flatten"]

MLFLOW_OPTIONS = ("experiment", "run_name", "tracking_uri", "artifact_location")
"""The ``track()`` options the MLflow tracker reads (the others go to W&B when both are on)."""
_MAX_PARAM = 6000  # MLflow's longest parameter value
_BATCH = 100  # MLflow's most params per log_batch
_REPORT_FILES = (REPORT_HTML, REPORT_FILE, CURVES_FILE, METRICS_FILE, RUN_FILE)
_ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEMPLATE_FILE)


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"training": {"lr": 1e-4}}`` -> ``("training.lr", "0.0001")``; lists and None as text."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, prefix=f"{name}.")
        else:
            yield name, str(value)[:_MAX_PARAM]


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise MissingDependencyError("track('mlflow') needs mlflow: pip install 'lorakit[mlflow]'") from error
    with quiet_logger("mlflow"), quiet_logger("alembic"):  # a new store's schema set-up notes (INFO)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # opens (and on first use creates) the store here
    return client


class MlflowTracker:
    """One MLflow run for one lorakit run: params at the start, metrics per log event, artifacts at the end."""

    def __init__(self, config: Mapping[str, Any], output_dir: Path, options: Mapping[str, Any]) -> None:
        self.client = _client(options.get("tracking_uri"))
        name = str(options.get("experiment") or "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                name, artifact_location=options.get("artifact_location")
            )
        run = self.client.create_run(
            experiment_id,
            run_name=redact(str(options.get("run_name") or output_dir.name)),
            tags={"lorakit.version": __version__, "lorakit.run_dir": redact(str(output_dir))},
        )
        self.run_id: str = run.info.run_id
        self.experiment_id: str = experiment_id
        self.finished = False
        self.closed = False
        self._log_params(redact(dict(config)))
        self.callback = _MlflowCallback(self)

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(config)]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + _BATCH])

    def log_metrics(self, step: int, logs: Mapping[str, Any]) -> None:
        """Every numeric value of one log event, at ``step``."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, int(step))
            for key, value in logs.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, output_dir: Path) -> None:
        """The report files under ``report/`` and the adapter (config, weights, template) under ``adapter/``."""
        for folder, names in (("report", _REPORT_FILES), ("adapter", _ADAPTER_FILES)):
            for name in names:
                path = output_dir / name
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self) -> None:
        """End the MLflow run: FINISHED when training reached its end, FAILED otherwise."""
        self.client.set_terminated(self.run_id, status="FINISHED" if self.finished else "FAILED")
        self.closed = True


class _MlflowCallback(TrainerCallback):
    def __init__(self, tracker: MlflowTracker) -> None:
        self.tracker = tracker

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics(state.global_step, logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker.finished = True

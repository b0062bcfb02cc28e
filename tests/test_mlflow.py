"""track("mlflow") against a real SQLite-backed MLflow tracking store, read back with MlflowClient."""

from __future__ import annotations

import pytest

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.tracking.mlflow import flatten

mlflow = pytest.importorskip("mlflow")

ROWS = [
    {"instruction": "Route this ticket.", "input": f"ticket {i}: the app crashes.", "output": "technical"}
    for i in range(12)
]


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MY_SERVICE_TOKEN", str(root / "secret-looking-value"))  # redacted wherever it appears
        pipeline = (
            lk.Pipeline.from_model(tiny_model_dir)
            .with_lora(r=4, alpha=8, dropout=0.0)
            .with_dataset(ROWS, template="alpaca", val_split=0.25, max_length=64)
            .with_training(max_steps=4, batch_size=4, lr=5e-3, logging_steps=2, eval_steps=2)
            .track(
                "tensorboard+mlflow",
                experiment="lorakit-test",
                artifact_location=str(root / "artifacts"),
                run_name=str(root / "secret-looking-value"),
            )
        )
        result = pipeline.train(root / "run")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lorakit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    return result, client, run


def test_params_are_the_whole_resolved_config_flattened(tracked, tiny_model_dir):
    result, _, run = tracked
    params = run.data.params
    assert params["training.lr"] == "0.005" and params["training.max_steps"] == "4"
    assert params["method.name"] == "lora" and params["method.r"] == "4" and params["data.max_length"] == "64"
    assert params["model.name_or_path"] == tiny_model_dir
    assert params["tracking.backend"] == "tensorboard+mlflow"
    assert params["tracking.experiment"] == "lorakit-test" and params["tracking.run_name"] == "***"
    assert run.info.run_name == "***"  # the secret-looking value is redacted in the run name too


def test_metrics_per_step_and_the_run_finished(tracked):
    result, client, run = tracked
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")][:2] == [2, 4]
    assert run.info.status == "FINISHED"
    assert run.data.tags["lorakit.run_dir"] == str(result.output_dir)


def test_report_and_adapter_are_artifacts(tracked):
    result, client, run = tracked
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"report/report.html", "report/report.md", "report/metrics.json"} <= report
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter
    local = client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors")
    with open(local, "rb") as fetched, open(result.output_dir / "adapter_model.safetensors", "rb") as saved:
        assert fetched.read() == saved.read()


def test_tensorboard_kept_working_next_to_mlflow(tracked):
    result, _, _ = tracked
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "mlflow" in (result.output_dir / "report.md").read_text()


def test_flatten_and_backend_validation():
    assert dict(flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}})) == {
        "a.b": "1",
        "a.c.d": "None",
        "e": "[1, 2]",
        "f": "{}",
    }
    with pytest.raises(
        ConfigError, match="`backend` must be one of 'none', 'wandb', 'tensorboard', 'mlflow'"
    ):
        lk.Pipeline().track("tensorboard+mlfow")
    with pytest.raises(ConfigError, match="Drop 'none'"):
        lk.Pipeline().track("none+mlflow")

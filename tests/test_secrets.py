"""Secrets never reach the run directory, the config, the report, the logs or the trackers' local files."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

import lorakit as lk
from lorakit.tracking.secrets import MASK, is_secret_name, redact, redact_text, secret_values

# Fake secrets planted in the environment: every value must be absent from every byte a run writes.
ENV_SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_FakeTokenPlantedByLorakitTests0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_AnotherFakeHubTokenForLorakit4567",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-password-9876",
    "MLFLOW_TRACKING_TOKEN": "mlflow-fake-token-5432",
    "OPENAI_API_KEY": "sk-fakeOpenAiKeyPlantedForLorakitTests",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY",
    "MY_SERVICE_DB_PASSWORD": "correct-horse-battery-staple",
    "INTERNAL_AUTH_SECRET": "internal-auth-secret-value-42",
}
# Credentials in URLs the user puts into options, and a token pasted into a tag: masked, never written.
URL_PASSWORD = "hunter2-url-password"
URL_WITH_CREDENTIALS = f"https://alice:{URL_PASSWORD}@data.example.com/train.jsonl?sig=sasSignature123456"
QUERY_SIGNATURE = "sasSignature123456"
PLANTED = [*ENV_SECRETS.values(), URL_PASSWORD, QUERY_SIGNATURE, "alice:"]

ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("hello", "yes", "no", "maybe")]


@pytest.mark.parametrize(
    ("name", "environment", "secret"),
    [
        ("HF_TOKEN", True, True),
        ("HUGGING_FACE_HUB_TOKEN", True, True),
        ("WANDB_API_KEY", True, True),
        ("AWS_SECRET_ACCESS_KEY", True, True),
        ("MLFLOW_TRACKING_PASSWORD", True, True),
        ("GITHUB_PAT", True, True),
        ("TOKENIZERS_PARALLELISM", True, False),
        ("PYTHONHASHSEED", True, False),
        ("PWD", True, False),  # the working directory, not a password
        ("PATH", True, False),
        ("api_key", False, True),
        ("apiKey", False, True),
        ("auth_token", False, True),
        ("password", False, True),
        ("eos_token", False, False),
        ("max_new_tokens", False, False),
        ("num_key_value_heads", False, False),
        ("tokenizer", False, False),
    ],
)
def test_secret_names(name, environment, secret):
    assert is_secret_name(name, environment=environment) is secret


def test_redact_text_masks_urls_queries_token_shapes_and_environment_values(monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "tok-abcdefgh1234")
    assert "tok-abcdefgh1234" in secret_values()
    assert redact_text(f"from {URL_WITH_CREDENTIALS} with tok-abcdefgh1234") == (
        f"from https://{MASK}@data.example.com/train.jsonl?sig={MASK} with {MASK}"
    )
    assert redact_text("git clone https://ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/a/b", []) == (
        f"git clone https://{MASK}@github.com/a/b"
    )
    assert (
        redact_text("key hf_abcdefghijklmnopqrstuvwx12 and AKIAIOSFODNN7EXAMPLE", [])
        == f"key {MASK} and {MASK}"
    )
    # Nothing else changes: plain URLs, query values with harmless names, paths.
    plain = "https://huggingface.co/datasets/x?split=train&revision=main /data/hf_cache/task-1"
    assert redact_text(plain, []) == plain


def test_redact_keeps_keys_and_non_secret_fields():
    config = {"eos_token": "</s>", "api_key": "abc", "max_new_tokens": 8, "nested": [{"password": "p"}]}
    assert redact(config, []) == {
        "eos_token": "</s>",
        "api_key": MASK,
        "max_new_tokens": 8,
        "nested": [{"password": MASK}],
    }


def _pipeline(model_dir, backend, **options):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0, max_length=64, cache=False)
        .with_training(max_steps=2, batch_size=2, logging_steps=1, warmup_ratio=0.0)
        .log_samples(["Say hello."], max_new_tokens=3, every=2)
        .track(backend, **options)
    )


def test_to_config_and_save_config_mask_secrets_but_keep_the_rows(tiny_model_dir, tmp_path, monkeypatch):
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    rows = [*ROWS, {"instruction": "Where is the data?", "output": URL_WITH_CREDENTIALS}]
    pipe = _pipeline(
        tiny_model_dir, "wandb", notes=f"data from {URL_WITH_CREDENTIALS}", tags=[ENV_SECRETS["HF_TOKEN"]]
    )
    pipe = pipe.with_dataset(rows, template="alpaca", val_split=0, max_length=64, cache=False)
    config = pipe.to_config()
    assert config["tracking"]["notes"] == f"data from https://{MASK}@data.example.com/train.jsonl?sig={MASK}"
    assert config["tracking"]["tags"] == [MASK]
    assert config["data"]["source"] == rows  # the rows are what trains: kept as they are
    assert pipe.to_config(keep_secrets=True)["tracking"]["notes"] == f"data from {URL_WITH_CREDENTIALS}"
    saved = pipe.save_config(tmp_path / "run.yaml").read_text()
    assert URL_PASSWORD in saved  # only inside the training rows
    assert saved.count(URL_PASSWORD) == 1
    assert yaml.safe_load(saved)["tracking"]["notes"] == config["tracking"]["notes"]
    assert all(value not in saved for value in ENV_SECRETS.values())


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_nothing_a_run_writes_or_prints_holds_a_planted_secret(
    backend, tiny_model_dir, tmp_path, monkeypatch, capfd, caplog
):
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    options = {"notes": f"data from {URL_WITH_CREDENTIALS}", "tags": [ENV_SECRETS["OPENAI_API_KEY"]]}
    if backend == "wandb":
        options["mode"] = "offline"  # an API key is set: without this W&B would go online
    caplog.set_level(logging.DEBUG)
    result = _pipeline(tiny_model_dir, backend, **options).train(tmp_path / "run")
    out, err = capfd.readouterr()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    tracker_files = [
        p for p in written if ("wandb" in p.parts if backend == "wandb" else "tfevents" in p.name)
    ]
    assert tracker_files, f"the {backend} tracker wrote nothing"
    assert (result.output_dir / "lorakit_run.json").is_file() and (result.output_dir / "report.md").is_file()
    sinks = {str(path): path.read_bytes() for path in written}
    sinks.update(stdout=out.encode(), stderr=err.encode(), logging=caplog.text.encode())
    leaks = [
        (value, where) for where, content in sinks.items() for value in PLANTED if value.encode() in content
    ]
    assert not leaks, f"planted secrets leaked: {leaks}"
    record = json.loads((result.output_dir / "lorakit_run.json").read_text())
    assert record["pipeline"]["tracking"]["tags"] == [MASK]
    assert record["pipeline"]["tracking"]["notes"].startswith(f"data from https://{MASK}@data.example.com/")
    print(f"scanned {len(written)} files ({sum(map(len, sinks.values()))} bytes with the captured output)")

"""Evaluation during training, generation samples, trackers and run reports, and lorakit.evaluate()."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError, DataError

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Route this ticket.", "input": "I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket.", "input": "My parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "How are you?", "input": "", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


def answer_length(predictions, references):
    """A custom metric: mean characters per answer."""
    return sum(len(p) for p in predictions) / len(predictions)


def _pipeline(model_dir, **training):
    settings = dict(
        max_steps=12, lr=5e-3, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
    )
    settings.update(training)
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val=ROWS[:4], max_length=128)
        .with_training(**settings)
    )


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


STEPS, EVERY = 24, 8


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tmp_path_factory):
    pipeline = (
        _pipeline(tiny_model_dir, max_steps=STEPS, lr=1e-2)
        .with_eval(
            ["perplexity", "rouge", "chrf", "exact_match", answer_length],
            every=EVERY,
            samples=3,
            max_new_tokens=8,
            batch_size=2,
        )
        .log_samples(n=2, max_new_tokens=8)
        .track("tensorboard")
    )
    return pipeline.train(tmp_path_factory.mktemp("runs") / "eval")


def test_eval_metrics_are_logged_at_each_evaluation(eval_run):
    log = _log(eval_run.output_dir / "metrics.jsonl")
    by_step: dict[int, dict] = {}
    for entry in log:
        if any(key.startswith("eval_") for key in entry):
            by_step.setdefault(entry["step"], {}).update(entry)
    assert sorted(by_step) == [8, 16, 24]
    # step 24 is the last: its evaluation is the run's final one, logged once, not run a second time
    assert sum("eval_loss" in entry for entry in log if entry["step"] == 24) == 1
    assert eval_run.metrics["eval_loss"] == by_step[24]["eval_loss"]
    for merged in by_step.values():
        assert merged["eval_perplexity"] == pytest.approx(math.exp(merged["eval_loss"]))
        for key in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_exact_match"):
            assert 0.0 <= merged[key] <= 1.0
        assert merged["eval_answer_length"] > 0 and 0 <= merged["eval_chrf"] <= 100
    assert by_step[24]["eval_loss"] < by_step[8]["eval_loss"]  # the tiny model learns its rows
    assert by_step[24]["eval_rouge1"] > 0.5 and by_step[24]["eval_chrf"] > by_step[8]["eval_chrf"]


def test_a_run_not_ending_on_an_evaluation_step_is_evaluated_at_its_end(tiny_model_dir, tmp_path):
    result = _pipeline(tiny_model_dir, max_steps=6).with_eval(["perplexity"], every=4).train(tmp_path / "run")
    log = _log(result.output_dir / "metrics.jsonl")
    assert [entry["step"] for entry in log if "eval_loss" in entry] == [4, 6]
    assert result.metrics["eval_loss"] == [e for e in log if "eval_loss" in e][-1]["eval_loss"]


def test_training_eval_numbers_equal_standalone_evaluate(eval_run):
    # The final evaluation generated for the first 3 validation rows; lorakit.evaluate on the saved run and
    # the same rows must give the same numbers.
    final = eval_run.metrics
    standalone = lk.evaluate(
        eval_run.output_dir,
        ROWS[:3],
        metrics=["rouge", "chrf", "exact_match", answer_length],
        max_new_tokens=8,
    )
    for key in ("rouge1", "rouge2", "rougeL", "chrf", "exact_match", "answer_length"):
        assert final[f"eval_{key}"] == pytest.approx(standalone.metrics[key], abs=1e-9), key
    assert standalone.metrics["rows"] == 3 and len(standalone.predictions) == 3


def test_generation_samples_go_to_the_local_log_and_tensorboard(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    samples = _log(eval_run.output_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [8, 8, 16, 16, 24, 24]
    assert "What is the capital of France?" in samples[0]["prompt"]
    assert "Say hello." in samples[1]["prompt"]
    model = lk.InferenceModel.load(eval_run.output_dir)
    assert samples[-2]["generation"] == model.generate(
        {"instruction": ROWS[0]["instruction"], "input": ""}, max_new_tokens=8
    )

    events = EventAccumulator(
        str(eval_run.output_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}
    )
    events.Reload()
    logged = {e["step"]: e["loss"] for e in _log(eval_run.output_dir / "metrics.jsonl") if "loss" in e}
    scalars = {s.step: s.value for s in events.Scalars("train/loss")}
    assert scalars == pytest.approx(logged, rel=1e-6) and len(scalars) == STEPS
    assert [s.step for s in events.Scalars("eval/rouge1")][:3] == [8, 16, 24]
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [8, 16, 24]
    assert "What is the capital of France?" in texts[0].tensor_proto.string_val[0].decode()


def test_run_report_and_curves(eval_run):
    out = eval_run.output_dir
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = (out / "report.md").read_text()
    assert f"| train_loss | {eval_run.metrics['train_loss']:.4g} |" in report
    assert "## Evaluations" in report and "eval_rouge1" in report and "| 24 |" in report
    assert "## Samples at step 24" in report and "![loss and metrics](curves.png)" in report
    assert f"tensorboard --logdir {out / 'tensorboard'}" in report


def test_with_eval_validates_at_the_builder_call(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir)
    with pytest.raises(ConfigError, match="Unknown metric 'blue'"):
        pipeline.with_eval(["blue"])
    with pytest.raises(ConfigError, match="`samples` must be a positive integer, got 0"):
        pipeline.with_eval(["rouge"], samples=0)
    with pytest.raises(ConfigError, match=r"`prompts\[0\]` must be a prompt string or a row dict, got int"):
        pipeline.log_samples([3])
    config = pipeline.with_eval(["rouge", answer_length], every=5).to_config()
    assert config["evaluation"]["metrics"] == ["rouge", "test_evaluation:answer_length"]


def test_train_checks_eval_settings_before_loading(tiny_model_dir, tmp_path):
    no_val = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=2)
    )
    with pytest.raises(ConfigError, match=r"with_eval\(\) needs a validation split"):
        no_val.with_eval(["rouge"]).train(tmp_path / "a")
    with pytest.raises(
        ConfigError, match=r"early_stopping\(metric=...\): 'rouge1' is not among the evaluation"
    ):
        _pipeline(tiny_model_dir).with_eval(["perplexity"]).early_stopping(2, metric="rouge1").train(
            tmp_path / "b"
        )
    with pytest.raises(
        ConfigError, match=r"with_checkpoints\(every=5\) must be a multiple of the evaluation"
    ):
        _pipeline(tiny_model_dir).with_eval(["perplexity"], every=2).with_checkpoints(5).train(tmp_path / "c")


SECRETS = {"HF_TOKEN": "hf_SECRETsecretSECRET123", "MY_SERVICE_API_KEY": "sk-SECRET-0123456789abcdef"}


def _wandb_history(path):
    """History rows of a W&B ``.wandb`` file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_offline_without_login_logs_loss_and_samples_and_no_secrets(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    result = (
        _pipeline(tiny_model_dir, max_steps=3)
        .log_samples(["Say hello."], max_new_tokens=4, every=3)
        .track("wandb", project="lorakit-test", name="offline")
        .train(tmp_path / "wb")
    )
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(next(runs[0].glob("*.wandb")))
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    logged = [e["loss"] for e in _log(result.output_dir / "metrics.jsonl") if "loss" in e]
    assert losses == pytest.approx(logged) and len(losses) == 3
    tables = [row for row in history if "samples/_type" in row]
    assert len(tables) == 1 and tables[0]["samples/_type"] == "table-file" and tables[0]["samples/nrows"] == 1
    table = json.loads((runs[0] / "files" / tables[0]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "generation"] and table["data"][0][:2] == [3, "Say hello."]
    report = (result.output_dir / "report.md").read_text()
    assert f"wandb sync {runs[0]}" in report
    # No secret from the environment reaches any file of the run (configs, logs, W&B files, report).
    for path in result.output_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in content, f"{value} leaked into {path}"


def test_redact_hides_secret_keys_and_environment_values(monkeypatch):
    from lorakit.tracking import redact

    monkeypatch.setenv("SOME_TOKEN", "tok-abcdefgh1234")
    config = {"model": "x", "api_key": "plain", "nested": [{"password": "p@ss"}, "url?t=tok-abcdefgh1234"]}
    assert redact(config) == {"model": "x", "api_key": "***", "nested": [{"password": "***"}, "url?t=***"]}


def test_evaluate_perplexity_and_bleu_match_a_manual_computation(tiny_model_dir):
    import sacrebleu
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lorakit.data import detect_format, encode, to_messages
    from lorakit.templates import get_template

    rows = ROWS[:5]
    batched = lk.evaluate(
        tiny_model_dir,
        rows,
        metrics=["perplexity", "bleu"],
        batch_size=3,
        max_new_tokens=6,
        template="alpaca",
    )
    single = lk.evaluate(
        lk.InferenceModel.from_model(tiny_model_dir, template="alpaca"),
        rows,
        metrics=["perplexity", "bleu"],
        batch_size=1,
        max_new_tokens=6,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = lk.InferenceModel.from_model(tiny_model_dir, template="alpaca").tokenizer
    total, count = 0.0, 0
    for index, row in enumerate(rows):
        messages = to_messages(row, detect_format(list(row)), row_index=index, source_name="rows")
        encoded = encode(messages, get_template("alpaca"), tokenizer, max_length=1024)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
        labels = torch.tensor(encoded.labels)
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
        count += int((labels[1:] != -100).sum())
    expected = math.exp(total / count)
    assert batched.metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert single.metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert batched.metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert batched.predictions == single.predictions  # left-padded batches generate what single rows do
    references = [r["output"] for r in rows]
    assert batched.metrics["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(list(batched.predictions), [references]).score
    )
    assert batched.metrics["rows"] == 5 and list(batched.references) == references
    table = lk.evaluation.compare(batched, single, metrics=["perplexity", "bleu"])
    assert re.search(r"\| model \s*\| perplexity \| bleu \|", table) and table.count("\n") == 3


def test_evaluate_rejects_bad_input(tiny_model_dir):
    with pytest.raises(DataError, match="row 0"):
        lk.evaluate(tiny_model_dir, [{"instruction": "no answer"}], metrics=["bleu"], template="alpaca")
    with pytest.raises(ConfigError, match="evaluate\\(model=...\\) takes a run directory"):
        lk.evaluate(123, ROWS, metrics=["bleu"])
    with pytest.raises(ConfigError, match="evaluate\\(batch_size=...\\) must be a positive integer, got 0"):
        lk.evaluate(tiny_model_dir, ROWS, metrics=["bleu"], batch_size=0)


def test_in_training_eval_loss_is_the_one_token_weighted_loss(tiny_model_dir, tmp_path):
    """eval_loss (logged, final, early stopping) is lorakit.metrics.loss's mean over every label token of the
    validation set, not the Trainer's mean of per-batch means: rows of very different lengths in batches of 3
    make the two differ."""
    from lorakit.metrics.loss import mean_token_nll

    val = [ROWS[0], ROWS[6], {"instruction": "Say hello.", "input": "", "output": "hello " * 12}, ROWS[3]]
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val=val, max_length=128)
        .with_training(max_steps=2, lr=5e-3, batch_size=3, warmup_ratio=0.0)
    )
    result = pipeline.train(tmp_path / "run")
    rows = pipeline.prepare_data().val
    examples = [(r["input_ids"], r["labels"]) for r in rows]
    model = lk.InferenceModel.load(result.output_dir)
    pad = model.tokenizer.pad_token_id
    expected, tokens = mean_token_nll(model.model, examples, batch_size=1, pad_token_id=pad)
    assert tokens > 20
    assert result.metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    # The Trainer's definition (batch means weighted by rows) gives another number on these rows.
    first, n_first = mean_token_nll(model.model, examples[:3], batch_size=3, pad_token_id=pad)
    last, n_last = mean_token_nll(model.model, examples[3:], batch_size=3, pad_token_id=pad)
    assert abs((3 * first + last) / 4 - expected) > 1e-4

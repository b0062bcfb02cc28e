"""The ``lorakit`` commands, each run in a subprocess against the tiny local model (as a user would run them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def lorakit(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = root / "tiny.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\n"
        "method: {name: lora, r: 8, alpha: 16, dropout: 0.0}\n"
        "data: {source: data/missing.jsonl, template: alpaca, val_split: 0.0, max_length: 128}\n"
        "training: {max_steps: 5, lr: 5.0e-3, batch_size: 4, logging_steps: 10, warmup_ratio: 0.0,"
        " scheduler: constant}\n"
    )
    return root, config, data


@pytest.fixture(scope="module")
def trained(workspace):
    root, config, data = workspace
    out = lorakit(
        "train",
        str(config),
        "--set",
        f"data.source={data}",
        "--set",
        "training.max_steps=30",
        "-o",
        str(root / "run"),
    )
    assert out.returncode == 0, out.stderr
    return root / "run", out


@pytest.fixture(scope="module")
def run_dir(workspace, tiny_model_dir):
    """The run the config describes, trained through the Python API (the run-reading commands are tested on
    it independently of `lorakit train`)."""
    import lorakit as lk

    root, _, data = workspace
    return (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(str(data), template="alpaca", val_split=0.0, max_length=128)
        .with_training(
            max_steps=30, lr=5.0e-3, batch_size=4, logging_steps=10, warmup_ratio=0.0, scheduler="constant"
        )
        .train(root / "run-api")
    ).output_dir


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys\nfrom lorakit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0
    assert out.stdout.strip().endswith("[]")
    for command in ("train", "explain", "eval", "generate", "chat", "merge", "quickstart"):
        assert command in out.stdout


def test_explain_with_overrides_and_config_errors(workspace):
    root, config, data = workspace
    out = lorakit("explain", str(config), "--set", f"data.source={data}", "--set", "method.r=4")
    assert out.returncode == 0, out.stderr
    assert "LoRA r=4 alpha=16" in out.stdout and "8 train / 0 validation" in out.stdout
    bad = lorakit("explain", str(config), "--set", "training.lr=-1")
    assert bad.returncode == 2
    assert (
        bad.stderr
        == "lorakit: error: `lr` must be a number in (0, 1.0], got -1. LoRA typically uses 1e-4..5e-4.\n"
    )
    missing = lorakit("explain", str(root / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.startswith(
        "lorakit: error: Cannot read pipeline config"
    )
    assert "Traceback" not in missing.stderr and missing.stderr.count("\n") == 1
    debug = lorakit("--debug", "explain", str(config), "--set", "training.lr=-1")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: `lr` must be a number" in debug.stderr


def test_train_writes_a_run(trained):
    run, out = trained
    assert f"lorakit train -> {run}" in out.stdout and "lorakit done:" in out.stdout
    assert (run / "adapter_model.safetensors").is_file() and (run / "lorakit_provenance.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 30


def test_generate_streams_the_reply(run_dir):
    run = run_dir
    out = lorakit("generate", str(run), "Say hello.", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello world\n"
    bad = lorakit("generate", str(run), "Say hello.", "--top-p", "2")
    assert (
        bad.returncode == 2
        and bad.stderr == "lorakit: error: `top_p` must be a number > 0 and <= 1, got 2.0.\n"
    )


def test_chat_reads_turns_from_stdin(run_dir):
    run = run_dir
    out = lorakit(
        "chat",
        str(run),
        "--max-new-tokens",
        "8",
        stdin="Say hello.\n\n/reset\nName a colour.\n/exit\nHow are you?\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello world\nbrown\n"  # the turn after /exit is never answered
    assert "(conversation cleared)" in out.stderr


def test_eval_reports_loss_perplexity_and_exact_match(run_dir, workspace, tmp_path):
    run = run_dir
    _, _, data = workspace
    results = tmp_path / "eval.json"
    out = lorakit("eval", str(run), str(data), "--limit", "4", "--json", str(results))
    assert out.returncode == 0, out.stderr
    numbers = json.loads(results.read_text())
    assert numbers["rows"] == 4 and numbers["exact_match"] == 1.0
    assert numbers["predictions"] == ["Paris.", "hello world", "billing", "shipping"]
    assert 1.0 <= numbers["perplexity"] < 1.5 and numbers["scored_tokens"] > 4
    assert out.stdout.startswith(f"{data}: 4 rows, loss {numbers['loss']:.4f}, perplexity ")
    assert out.stdout.rstrip().endswith("exact match 100.0%")
    missing = lorakit("eval", str(run), str(tmp_path / "none.jsonl"))
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_merge_verifies_and_exports(run_dir, tmp_path):
    from transformers import AutoTokenizer

    run = run_dir
    out = lorakit("merge", str(run), str(tmp_path / "merged"), "--max-shard-size", "200KB")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("merge check on 4 sequences") and "merged weights float32" in out.stdout
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("### Instruction:\nSay hello.\n\n### Response:\n")
    from lorakit.inference import InferenceModel

    assert InferenceModel.load(tmp_path / "merged").generate("Say hello.", max_new_tokens=8) == "hello world"
    not_a_run = lorakit("merge", str(tmp_path), str(tmp_path / "x"))
    assert not_a_run.returncode == 2
    assert "holds neither lorakit_run.json (a lorakit run) nor adapter_config.json" in not_a_run.stderr

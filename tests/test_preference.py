"""Preference tuning (issue 18): with_preference (DPO, KTO, ORPO, CPO), preference rows, Pipeline.from_run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import lorakit as lk
from lorakit.data import encode, encode_prompt
from lorakit.data.preference import preference_sample_path, prepare_preference_data
from lorakit.errors import ConfigError, DataError
from lorakit.templates import get_template

PAIRS = [
    {
        "prompt": f"Route ticket {i}: my card was charged twice",
        "chosen": "Thank you, I have routed this to billing.",
        "rejected": "shipping.",
    }
    for i in range(8)
]
UNPAIRED = [
    {
        "prompt": f"Route ticket {i}",
        "completion": "Routed to billing, thank you." if i % 2 else "no.",
        "label": bool(i % 2),
    }
    for i in range(8)
]
SFT_ROWS = [{"prompt": f"What is {i}?", "completion": f"It is {i}."} for i in range(8)]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


class Watch(TrainerCallback):
    """Copies of the base weights and the adapter weights when training begins and ends."""

    def __init__(self) -> None:
        self.begin: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    @staticmethod
    def _weights(model) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin = self._weights(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = self._weights(model)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(SFT_ROWS, template="chatml", val_split=0.0, max_length=128)
        .with_training(max_steps=2, batch_size=2, lr=1e-2)
        .train(out)
    )
    return out


# --- rows: the tokens SFT would train, bad rows ----------------------------------------------------------


def test_prompt_chosen_rejected_tokens_equal_the_sft_rendering(tiny_tokenizer):
    template = get_template("chatml")
    messages_form = [
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Route: card charged twice"},
            ],
            "chosen": [{"role": "assistant", "content": "Routed to billing, thank you."}],
            "rejected": [{"role": "assistant", "content": "no."}],
        }
    ]
    row = prepare_preference_data(
        messages_form, tokenizer=tiny_tokenizer, template=template, paired=True, val_split=0.0
    ).train[0]
    prompt = messages_form[0]["prompt"]
    assert row["prompt_ids"] == encode_prompt(prompt, template, tiny_tokenizer)
    for side, reply in (("chosen_ids", "Routed to billing, thank you."), ("rejected_ids", "no.")):
        sft = encode(
            [*prompt, {"role": "assistant", "content": reply}], template, tiny_tokenizer, max_length=512
        )
        trained = [token for token in sft.labels if token != -100]
        assert row["prompt_ids"] + row[side] == sft.input_ids[: len(row["prompt_ids"]) + len(trained)]
        assert row[side] == trained  # exactly the tokens SFT trains: the reply and its <|im_end|>
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "no.<|im_end|>"

    # A plain-string row renders as a one-turn user prompt, the same tokens as its message form.
    strings = [
        {"prompt": "Route: card charged twice", "chosen": "Routed to billing, thank you.", "rejected": "no."}
    ]
    as_text = prepare_preference_data(
        strings, tokenizer=tiny_tokenizer, template=template, paired=True, val_split=0.0
    )
    user_only = [{"role": "user", "content": "Route: card charged twice"}]
    assert as_text.train[0]["prompt_ids"] == encode_prompt(user_only, template, tiny_tokenizer)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "p", "chosen": "a"},
            "the list of rows, row 1: field 'rejected' is missing; paired rows (DPO, ORPO, CPO) need prompt, chosen, "
            "rejected (fields present: ['chosen', 'prompt']). Map your columns with with_dataset(columns={...})",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "  "},
            "the list of rows, row 1: field 'rejected' is empty",
        ),
        (
            {"prompt": "p", "chosen": "same", "rejected": "same "},
            "the list of rows, row 1: field 'rejected' is identical to 'chosen': the pair teaches no preference. "
            "Fix or drop the row",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "word " * 80},
            "the list of rows, row 1: field 'rejected' would be cut away by max_length=48: prompt and rejected are ",
        ),
    ],
)
def test_bad_paired_rows_name_row_and_field_or_are_skipped(tiny_tokenizer, row, message):
    good = {"prompt": "Route it", "chosen": "billing, thanks.", "rejected": "no."}
    options = dict(tokenizer=tiny_tokenizer, template="chatml", paired=True, val_split=0.0, max_length=48)
    with pytest.raises(DataError) as error:
        prepare_preference_data([good, row], **options)
    assert str(error.value).startswith(message)
    skipped = prepare_preference_data([good, row, good], on_bad_row="skip", **options)
    assert (skipped.report.train_rows, skipped.report.skipped_bad_rows) == (2, 1)
    assert skipped.report.bad_row_examples[0].startswith(message)


def test_bad_unpaired_row(tiny_tokenizer):
    rows = [{"prompt": "p", "completion": "c", "label": "yes"}]
    with pytest.raises(
        DataError, match=r"^the list of rows, row 0: field 'label' must be true \(desirable\) or false"
    ):
        prepare_preference_data(
            rows, tokenizer=tiny_tokenizer, template="chatml", paired=False, val_split=0.0
        )


def test_kto_unpairs_paired_rows(tiny_tokenizer):
    options = dict(tokenizer=tiny_tokenizer, template="chatml", val_split=0.0)
    pairs = prepare_preference_data(PAIRS[:2], paired=True, **options).train
    unpaired = prepare_preference_data(PAIRS[:2], paired=False, **options).train
    assert unpaired["label"] == [True, False, True, False]
    assert unpaired["completion_ids"][:2] == [pairs["chosen_ids"][0], pairs["rejected_ids"][0]]


def test_bundled_preference_data_prepares_offline(tiny_tokenizer):
    train = prepare_preference_data(
        preference_sample_path("train"),
        tokenizer=tiny_tokenizer,
        template="chatml",
        paired=True,
        max_length=512,
    )
    test = prepare_preference_data(
        preference_sample_path("test"),
        tokenizer=tiny_tokenizer,
        template="chatml",
        paired=True,
        val_split=0.0,
        max_length=512,
    )
    assert (train.report.rows_loaded, test.report.rows_loaded, train.report.skipped_bad_rows) == (240, 90, 0)


# --- the builder: refused at the call ---------------------------------------------------------------------


def test_unknown_objectives_options_and_methods_are_refused_at_the_call(tiny_model_dir):
    base = lk.Pipeline.from_model(tiny_model_dir)
    with pytest.raises(
        ConfigError,
        match=r"with_preference\('ppo'\): unknown objective; choose one of 'dpo', 'kto', 'orpo', 'cpo'\.",
    ):
        base.with_preference("ppo")
    with pytest.raises(
        ConfigError, match=r"unknown option\(s\) gamma; valid options: beta, loss_type, label_smoothing"
    ):
        base.with_preference("dpo", gamma=1.0)
    with pytest.raises(ConfigError, match=r"beta=...\) must be a positive number, got 0"):
        base.with_preference("kto", beta=0)
    with pytest.raises(
        ConfigError, match=r"cannot train with full_finetune\(\)|cannot train with with_full\(\)"
    ):
        base.with_preference("dpo").full_finetune()
    with pytest.raises(ConfigError, match="AdaLoRA's rank allocation"):
        base.with_adalora().with_preference("dpo")
    with pytest.raises(ConfigError, match=r"with_eval\(\) measures the SFT loss"):
        base.with_preference("dpo").with_eval()
    with pytest.raises(ConfigError, match=r"cannot train with with_prompt_tuning\(\): TRL's ORPO / CPO loss"):
        base.with_prompt_tuning().with_preference("orpo")
    base.with_prompt_tuning().with_preference("dpo")  # DPO skips the virtual tokens: allowed


def test_from_run_keeps_the_runs_adapter_and_template(sft_run, tiny_model_dir):
    pipeline = lk.Pipeline.from_run(sft_run)
    assert pipeline.start.path == str(sft_run) and pipeline.start.adapter
    assert pipeline.model.name_or_path == tiny_model_dir and pipeline.method.r == 4
    assert pipeline.with_dataset(PAIRS).data.template.name == "chatml"  # the earlier run's template
    with pytest.raises(ConfigError, match=r"with_lora\(\) after from_run\(.*\): that run's adapter"):
        pipeline.with_lora(r=8)


def test_from_run_refuses_remote_code_unless_trusted(sft_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(sft_run, copy)
    record = json.loads((copy / "lorakit_run.json").read_text())
    record["pipeline"]["model"]["trust_remote_code"] = True
    (copy / "lorakit_run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"lorakit_run.json.*trust_remote_code"):
        lk.Pipeline.from_run(copy)
    assert lk.Pipeline.from_run(copy, trust_remote_code=True).model.trust_remote_code


def test_yaml_round_trip(sft_run, tmp_path):
    pipeline = (
        lk.Pipeline.from_run(sft_run)
        .with_dataset(PAIRS, val_split=0.25)
        .with_preference("dpo", beta=0.2, loss_type="ipo")
        .early_stopping(metric="eval_rewards/margins", patience=2)
    )
    path = pipeline.save_config(tmp_path / "dpo.yaml")
    again = lk.Pipeline.from_config(path)
    assert again.preference == pipeline.preference and again.start == pipeline.start
    assert again.to_config() == pipeline.to_config()
    assert (
        "preference:\n  objective: dpo\n  beta: 0.2\n  options:\n    loss_type: ipo\nstart:\n  path: "
        in path.read_text()
    )


# --- training ---------------------------------------------------------------------------------------------


def test_sft_then_dpo_from_run(sft_run, tmp_path):
    watch = Watch()
    result = (
        lk.Pipeline.from_run(sft_run)
        .with_dataset(PAIRS, val_split=0.25, max_length=128)
        .with_preference("dpo", beta=0.1)
        .with_training(max_steps=2, batch_size=2, lr=5e-2, logging_steps=1)
        .early_stopping(metric="eval_rewards/margins", patience=5)
        .train(tmp_path / "dpo", callbacks=[watch])
    )
    parent = _adapter(sft_run)
    begin = {n.replace(".default", ""): t for n, t in watch.begin.items() if ".default." in n}
    assert len(parent) == len(begin) > 0
    for name, tensor in parent.items():  # the policy started from the SFT adapter ...
        key = name.replace("base_model.model.", "base_model.model.", 1)
        torch.testing.assert_close(begin[key], tensor)
    after = _adapter(tmp_path / "dpo")
    assert any(not torch.equal(after[n], parent[n]) for n in parent)  # ... and trained it
    for name, tensor in watch.begin.items():
        if "lora_" not in name:
            assert torch.equal(watch.end[name], tensor), name  # the base never moved
        elif ".ref." in name:
            assert torch.equal(watch.end[name], tensor), name  # the frozen reference adapter never moved
    assert not (tmp_path / "dpo" / "ref").exists()  # only the trained adapter is saved

    metrics = result.metrics
    for key in (
        "eval_loss",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
    ):
        assert isinstance(metrics[key], float), key
    assert "eval_perplexity" not in metrics and metrics["train_loss_tokens"] > 0
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in row for row in logged) and any(
        "eval_rewards/margins" in row for row in logged
    )
    provenance = json.loads((tmp_path / "dpo" / "lorakit_provenance.json").read_text())
    assert provenance["parent_run"] == str(sft_run)
    assert json.loads((tmp_path / "dpo" / "lorakit_run.json").read_text())["parent_run"] == str(sft_run)
    assert "eval_rewards/margins" in (tmp_path / "dpo" / "report.md").read_text()
    answer = lk.InferenceModel.load(tmp_path / "dpo").chat(
        [{"role": "user", "content": "Route ticket 1"}], max_new_tokens=3
    )
    assert isinstance(answer, str)


def test_sft_then_sft_from_run(sft_run, tmp_path):
    watch = Watch()
    lk.Pipeline.from_run(sft_run).with_dataset(SFT_ROWS, val_split=0.0, max_length=128).with_training(
        max_steps=1, batch_size=2, lr=1e-2, warmup_ratio=0.0
    ).train(tmp_path / "again", callbacks=[watch])
    parent = _adapter(sft_run)
    started = {n.replace(".default", ""): t for n, t in watch.begin.items() if "lora_" in n}
    for name, tensor in parent.items():
        torch.testing.assert_close(started[name], tensor)
    assert any(not torch.equal(_adapter(tmp_path / "again")[n], parent[n]) for n in parent)


@pytest.mark.parametrize(("objective", "rows"), [("orpo", PAIRS), ("kto", UNPAIRED)])
def test_other_objectives_train_the_adapter_only(tiny_model_dir, tmp_path, objective, rows):
    watch = Watch()
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(rows, template="chatml", val_split=0.0, max_length=128)
        .with_preference(objective)
        .with_training(max_steps=2, batch_size=4 if objective == "kto" else 2, lr=5e-2, logging_steps=1)
        .train(tmp_path / objective, callbacks=[watch])
    )
    assert result.metrics["train_steps"] == 2
    changed = {n for n, t in watch.begin.items() if not torch.equal(watch.end[n], t)}
    assert changed and all("lora_" in n for n in changed)
    logged = (tmp_path / objective / "metrics.jsonl").read_text()
    assert "rewards/chosen" in logged


RESUME_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback

    sys.path.insert(0, {tests!r})
    from test_preference import resumable

    model_dir, out = sys.argv[1:3]

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # checkpoint-2 is complete; step 3 is lost
                os.kill(os.getpid(), signal.SIGKILL)

    resumable(model_dir).train(out, callbacks=[Kill()])
    """
)


def resumable(model_dir):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(PAIRS, template="chatml", val_split=0.0, max_length=128)
        .with_preference("dpo")
        .with_training(max_steps=4, batch_size=2, lr=5e-2, seed=3)
        .with_checkpoints(every=2, keep=2)
    )


def test_dpo_killed_then_resumed_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    whole = resumable(tiny_model_dir).train(tmp_path / "whole")
    out, script = tmp_path / "killed", tmp_path / "child.py"
    script.write_text(RESUME_CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lk.__file__).parents[1]), *sys.path])}
    child = subprocess.run(
        [sys.executable, str(script), tiny_model_dir, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    resumed = resumable(tiny_model_dir).train(out, resume=True)
    assert resumed.metrics["train_steps"] == whole.metrics["train_steps"] == 4
    expected, after = _adapter(whole.output_dir), _adapter(out)
    assert expected.keys() == after.keys()
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6)


# --- issue 18 follow-up: the CLI with a YAML config, KTO's step count, early stopping on preference metrics


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(lk.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_lorakit_train_yaml_with_a_start_run_and_dpo(sft_run, tmp_path):
    # A hand-written config: `start:` names the SFT run (base model, adapter and template come from it, as
    # Pipeline.from_run), `preference:` the objective. Trained by the command line, as a user runs it.
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"start: {sft_run}\n"
        f"data: {{source: {data}, val_split: 0.25, max_length: 128}}\n"
        "preference: {objective: dpo, beta: 0.1}\n"
        "training: {max_steps: 3, batch_size: 2, lr: 5.0e-2, logging_steps: 1, warmup_ratio: 0.0}\n"
    )
    pipeline = lk.Pipeline.from_config(config)
    assert pipeline.start.path == str(sft_run) and pipeline.method.r == 4
    assert pipeline.data.template.name == "chatml"  # the SFT run's template, not the DataSpec default
    explained = pipeline.explain()
    assert "objective        DPO" in explained and "kept frozen as adapter 'ref'" in explained

    out = tmp_path / "run"
    trained = _cli("train", str(config), "-o", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((out / "lorakit_run.json").read_text())
    assert record["pipeline"]["preference"] == {"objective": "dpo", "beta": 0.1, "options": {}}
    assert record["pipeline"]["start"] == {"path": str(sft_run), "adapter": True}
    assert record["parent_run"] == str(sft_run)
    parent, after = _adapter(sft_run), _adapter(out)
    assert parent.keys() == after.keys()
    assert any(not torch.equal(after[name], parent[name]) for name in parent)  # DPO trained the SFT adapter
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "rewards/accuracies" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all(0.0 <= row["rewards/accuracies"] <= 1.0 for row in steps)
    assert any("eval_rewards/margins" in row for row in logged)
    # The run directory is itself a config: the DPO run's pipeline again, with its start run.
    again = lk.Pipeline.from_config(out)
    assert again.preference == pipeline.preference and again.start == pipeline.start


def test_config_start_refuses_another_method(sft_run, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"start: {{path: {sft_run}}}\nmethod: {{name: lora, r: 16}}\npreference: {{objective: dpo}}\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"method 'LoRA r=16 .*' with start: .*: that run's adapter \(LoRA r=4 .*\) keeps training",
    ):
        lk.Pipeline.from_config(config)


def test_kto_on_paired_rows_explains_the_steps_it_trains(tiny_model_dir, tmp_path):
    # 8 pairs unpair into 16 KTO rows: 12 train + 4 validation (val_split 0.25) -> 3 steps of 4 per epoch.
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(PAIRS, template="chatml", val_split=0.25, max_length=128)
        .with_preference("kto")
        .with_training(epochs=2, batch_size=4, lr=1e-2, logging_steps=1)
    )
    plan = pipeline.plan()
    assert (plan.train_rows, plan.val_rows, plan.steps_per_epoch, plan.total_steps) == (12, 4, 3, 6)
    assert "steps            6 optimizer steps (3 per epoch)" in pipeline.explain()
    result = pipeline.train(tmp_path / "kto")
    assert result.metrics["train_steps"] == plan.total_steps
    assert result.data_report["train_rows"] == plan.train_rows


def test_early_stopping_and_best_checkpoint_on_a_preference_metric(tiny_model_dir, tmp_path):
    # min_delta no evaluation can beat: the first evaluation (step 2) stays the stopper's best, two more
    # (steps 4, 6) without improvement stop the run at step 6 of 20. The best checkpoint is picked by the
    # logged eval_rewards/margins and is the adapter the run directory ends with.
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(PAIRS, template="chatml", val_split=0.25, max_length=128)
        .with_preference("dpo")
        .with_training(max_steps=20, batch_size=2, lr=5e-2, logging_steps=1, eval_steps=2, warmup_ratio=0.0)
        .with_checkpoints(every=2, keep=1, best_metric="eval_rewards/margins")
        .early_stopping(patience=2, metric="eval_rewards/margins", min_delta=1e6)
        .train(tmp_path / "run")
    )
    assert result.metrics["early_stopped_at_step"] == 6 and result.metrics["train_steps"] == 6
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval_rewards/margins"] for row in logged if "eval_rewards/margins" in row}
    assert sorted(evals)[:3] == [2, 4, 6]
    best_step = max((2, 4, 6), key=lambda step: evals[step])
    assert result.metrics["best_step"] == best_step
    assert result.metrics["best_eval_rewards/margins"] == pytest.approx(evals[best_step])
    final = _adapter(tmp_path / "run")
    best = _adapter(tmp_path / "run" / "checkpoints" / f"checkpoint-{best_step}")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)

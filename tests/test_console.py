"""The training console (lorakit.console) and the silenced third-party notices (lorakit.noise)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from transformers import TrainerControl, TrainerState

import lorakit as lk
from lorakit import noise
from lorakit.console import TrainingConsole, final_summary, remove_default_printers

ROWS = [
    {"instruction": "Route this ticket.", "input": f"ticket {i}: I was charged twice.", "output": "billing"}
    for i in range(12)
]


def _events(console: TrainingConsole, total: int, every_log: int = 1) -> None:
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = True
    console.on_train_begin(None, state, control)
    for step in range(1, total + 1):
        state.global_step = step
        console.on_step_end(None, state, control)
        if step % every_log == 0:
            logs = {"loss": 10.0 / step, "learning_rate": 1e-3, "num_tokens": 100.0 * step, "epoch": 0.1}
            console.on_log(None, state, control, logs=logs)
        if step == 10:
            evaluation = {"eval_loss": 1.5, "eval_runtime": 0.2, "eval_num_tokens": 3.0, "eval_rouge1": 0.25}
            console.on_log(None, state, control, logs=evaluation)
    console.on_train_end(None, state, control)
    console.on_log(None, state, control, logs={"eval_loss": 1.25, "eval_samples_per_second": 9.0})


def test_log_file_console_prints_a_line_about_every_tenth_of_the_run():
    out = io.StringIO()
    _events(TrainingConsole(30, live=False, stream=out), 30)
    lines = out.getvalue().splitlines()
    train_lines = [line for line in lines if line.startswith("step")]
    assert [line.split()[1] for line in train_lines] == [f"{s}/30" for s in range(3, 31, 3)]
    assert train_lines[0].startswith("step   3/30  loss 3.3333  lr 1.00e-03  ")
    assert "tok/s" in train_lines[1] and "elapsed, eta" in train_lines[1]
    # evaluation lines: quality numbers only (no runtime / token counts); the one after training is "final"
    assert "eval  step 10/30  eval_loss 1.5  eval_rouge1 0.25" in lines
    assert lines[-1] == "final eval  eval_loss 1.25"
    assert len(lines) == 12 and not any("{" in line for line in lines)


def test_live_console_keeps_one_bar_and_writes_evaluations_above_it():
    out = io.StringIO()
    console = TrainingConsole(20, live=True, stream=out)
    _events(console, 20, every_log=5)
    text = out.getvalue()
    assert "lorakit" in text and "20/20" in text and "loss 0.5000" in text  # the bar's last postfix
    assert "\neval  step 10/20  eval_loss 1.5  eval_rouge1 0.25" in "\n" + text.replace("\r", "\n")
    assert console.bar is None  # closed at the end of training
    assert not any(line.startswith("step ") for line in text.replace("\r", "\n").splitlines())


def test_final_summary_names_losses_speed_and_where_things_are(tmp_path):
    metrics = {"train_loss": 1.23456, "train_steps": 30, "train_runtime": 75.5, "train_tokens": 7424}
    metrics |= {"train_tokens_per_second": 98.3, "eval_loss": 2.5, "eval_perplexity": 12.18}
    text = final_summary(metrics, tmp_path, tmp_path / "report.html")
    assert text.splitlines() == [
        "lorakit done: 30 steps in 1:15 (75.5 s), 7,424 tokens, 98 tokens/s",
        "  train loss 1.2346, eval loss 2.5000, perplexity 12.18",
        f"  adapter  {tmp_path}",
        f"  report   {tmp_path / 'report.html'}",
    ]


def test_quiet_silences_only_the_listed_notices_and_restores_everything():
    filters, level = list(warnings.filters), logging.getLogger("transformers").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with noise.quiet():
            for entry in noise.SILENCED_WARNINGS:  # attributed to the third-party module, as they are raised
                text = entry.message.replace("\\", "") + " (test)"
                warnings.warn_explicit(text, entry.category, "x.py", 1, module=entry.module.replace("\\", ""))
            warnings.warn("the user's own warning", UserWarning, stacklevel=1)
            warnings.warn_explicit(
                "`is_gradient_checkpointing` is deprecated", FutureWarning, "user.py", 1, module="user_code"
            )
            assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR
    messages = [str(w.message) for w in caught]
    assert messages == ["the user's own warning", "`is_gradient_checkpointing` is deprecated"]
    assert warnings.filters == filters and logging.getLogger("transformers").level == level


@pytest.fixture(scope="module")
def console_run(tiny_model_dir, tmp_path_factory):
    from transformers import TrainerCallback

    class UserWarns(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                warnings.warn("a warning from the user's callback", UserWarning, stacklevel=1)

    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.25, max_length=64)
        .with_training(max_steps=6, batch_size=4, lr=5e-3, logging_steps=2, eval_steps=3)
    )
    filters, levels = (
        list(warnings.filters),
        {n: logging.getLogger(n).level for n in ("transformers", "kernels")},
    )
    out_dir = tmp_path_factory.mktemp("console") / "run"
    return pipeline, out_dir, filters, levels, UserWarns()


def test_a_training_run_prints_lorakits_console_not_raw_dicts(console_run, capsys):
    pipeline, out_dir, filters, levels, user_callback = console_run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.train(out_dir, callbacks=[user_callback])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[lines.index(f"lorakit train -> {out_dir}") + 3].startswith("  parameters  ")
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["2/6", "4/6", "6/6"]
    # evaluations at steps 3 and 6; the run's final evaluation is the one at step 6 (same weights), not a third
    assert [line.split()[2] for line in lines if line.startswith("eval  step ")] == ["3/6", "6/6"]
    assert not any("final eval" in x for x in lines)
    assert f"  report   {out_dir / 'report.html'}" in lines and "{'loss'" not in out.out + out.err
    assert len(lines) < 30, out.out
    messages = [str(w.message) for w in caught]
    assert "a warning from the user's callback" in messages  # the user's own warning still shows
    assert not any(
        entry.message.replace("\\", "")[:20] in m for m in messages for entry in noise.SILENCED_WARNINGS
    )
    # nothing global changed: warning filters and logger levels are as before train()
    assert warnings.filters == filters
    assert {n: logging.getLogger(n).level for n in levels} == levels


def test_remove_default_printers_takes_off_transformers_bars_only():
    from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

    class Trainer:
        callback_handler = CallbackHandler(
            [PrinterCallback(), ProgressCallback(), TrainingConsole(3)], *[None] * 4
        )

    remove_default_printers(Trainer)
    assert [type(cb).__name__ for cb in Trainer.callback_handler.callbacks] == ["TrainingConsole"]

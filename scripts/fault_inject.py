"""Fault injection: SIGKILL a tiny training run at many points, resume, and compare with an uninterrupted run.

Each trial trains a 2-layer Llama (built locally, no network) with a checkpoint at every step and an evaluation
every second step in a child process, kills it with SIGKILL at one point (a hook the child installs, or a timer
in the parent), then resumes in this process with ``train(dir, resume=True)`` (or starts again when no
checkpoint was complete) and compares the final adapter with the uninterrupted run's::

    python scripts/fault_inject.py                    # every named kill point + 12 timed kills
    python scripts/fault_inject.py --points step:3,eval:4 --timed 0

Kill points (``<kind>:<step>``; the ``final-*`` ones take no step):

    step:K            during optimizer step K (after the backward pass, before the optimizer step)
    eval:K            during the evaluation at step K
    save-model:K      checkpoint K: the adapter is written, the optimizer not yet
    save-optimizer:K  checkpoint K: optimizer and scheduler written, the RNG state not yet
    save-torn:K       checkpoint K: optimizer.pt cut to a third (a torn write), then killed
    save-record:K     checkpoint K: everything but the resume record written
    save-seal:K       checkpoint K: every file written, the manifest not yet (not sealed)
    publish:K         checkpoint K published, the older ones not yet rotated away
    final-weights     the final adapter file torn (cut to a third) in the run directory
    final-record      the final adapter and tokenizer written, the run record not yet
    final-report      the run record written, the report not yet
    overwrite:K       overwrite=True over a finished older run, killed during step K
    power-loss:K      killed during step K, then the latest checkpoint's optimizer.pt left empty (what a power
                      loss can leave of a file that was never flushed): the resume must skip that checkpoint

It prints one row per trial (kill point, the step resumed from, whether the final adapter equals the
uninterrupted run's) and the count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

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
STEPS = 6
NAMED_POINTS = (
    "step:1",
    "step:3",
    "step:5",
    "eval:2",
    "eval:4",
    "save-model:2",
    "save-optimizer:3",
    "save-torn:4",
    "save-record:5",
    "save-seal:4",
    "save-seal:6",
    "publish:3",
    "final-weights",
    "final-record",
    "final-report",
    "overwrite:2",
    "overwrite:5",
    "power-loss:4",
)
CI_POINTS = ("step:3", "save-seal:4", "eval:4", "final-weights")


def pipeline(model_dir: str, data: str, seed: int = 7) -> Any:
    import lorakit as lk

    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.1)
        .with_dataset(data, template="alpaca", val=ROWS[:2], max_length=128)
        .with_training(
            max_steps=STEPS,
            lr=5e-3,
            batch_size=2,
            logging_steps=1,
            warmup_ratio=0.25,
            seed=seed,
            eval_steps=2,
        )
        .with_checkpoints(every=1, keep=2, best_metric=None)  # save_steps=1, two kept
    )


# --- the child: install one kill hook, train ---------------------------------------------------------------------


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in(owner: Any, name: str, when: Any, *, after: bool = False) -> None:
    """Replace ``owner.name`` by a wrapper that SIGKILLs this process when ``when(self_or_first_arg)`` holds,
    before the call (or after it with ``after=True``)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not after and when(*args):
            _kill()
        result = original(*args, **kwargs)
        if after and when(*args):
            _kill()
        return result

    setattr(owner, name, wrapper)


def install_hook(point: str, out: Path) -> None:
    import torch
    from peft import PeftModel

    from lorakit import checkpoints, rundir, training
    from lorakit import trainer as lorakit_trainer

    kind, _, arg = point.partition(":")
    step = int(arg) if arg else -1
    trainer_class = lorakit_trainer.LorakitTrainer

    def at_step(trainer: Any, *_: Any) -> bool:
        return trainer.state.global_step == step

    if kind in ("step", "overwrite", "power-loss"):
        _kill_in(trainer_class, "training_step", lambda t, *_: t.state.global_step + 1 == step, after=True)
    elif kind == "eval":
        _kill_in(trainer_class, "evaluation_loop", at_step)
    elif kind == "save-model":
        _kill_in(trainer_class, "_save_optimizer_and_scheduler", at_step)
    elif kind == "save-optimizer":
        _kill_in(trainer_class, "_save_rng_state", at_step)
    elif kind == "save-record":
        _kill_in(checkpoints, "write_resume_record", lambda path, *_: rundir.checkpoint_step(path) == step)
    elif kind == "save-seal":
        _kill_in(rundir, "seal_checkpoint", lambda path: rundir.checkpoint_step(path) == step)
    elif kind == "publish":
        rotate = lorakit_trainer.rotate_checkpoints

        def rotate_or_kill(**kwargs: Any) -> Any:
            if (Path(kwargs["output_dir"]) / rundir.checkpoint_name(step)).is_dir():
                _kill()  # checkpoint-<step> was just published; the older ones are still there
            return rotate(**kwargs)

        lorakit_trainer.rotate_checkpoints = rotate_or_kill
    elif kind == "save-torn":
        real_save = torch.save

        def torn_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            real_save(obj, f, *args, **kwargs)
            path = Path(str(f))
            if path.name == rundir.OPTIMIZER_FILE and rundir.checkpoint_step(path.parent) == step:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
                _kill()

        torch.save = torn_save
    elif kind == "final-weights":
        real = PeftModel.save_pretrained

        def torn_final(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> Any:
            real(self, save_directory, *args, **kwargs)
            if Path(save_directory) == out:
                weights = out / rundir.ADAPTER_WEIGHTS
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
                _kill()

        PeftModel.save_pretrained = torn_final
    elif kind == "final-record":
        _kill_in(rundir.RunDir, "write_run", lambda *_: True)
    elif kind == "final-report":
        _kill_in(training, "write_run_report", lambda *_, **__: True)
    elif kind != "none":
        raise SystemExit(f"unknown kill point {point!r}")


def child_main(point: str, model_dir: str, data: str, out: str, overwrite: bool, seed: int) -> None:
    install_hook(point, Path(out))
    pipeline(model_dir, data, seed).train(out, overwrite=overwrite)


# --- the parent: kill, resume, compare -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
        "PYTHONWARNINGS": "ignore",
    }


def run_child(
    point: str,
    model_dir: str,
    data: str,
    out: Path,
    *,
    overwrite: bool = False,
    seed: int = 7,
    kill_after=None,
) -> int:
    """Run the child; with ``kill_after`` (seconds) the parent SIGKILLs it then. Returns its exit code."""
    command = [
        sys.executable,
        __file__,
        "--child",
        point,
        model_dir,
        data,
        str(out),
        str(int(overwrite)),
        str(seed),
    ]
    child = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, stderr = child.communicate(timeout=kill_after if kill_after is not None else 900)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
    if child.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the child failed at {point!r}: {stderr.decode()[-3000:]}")
    return child.returncode


def adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def compare(reference: dict[str, Any], found: dict[str, Any]) -> tuple[bool, bool, float]:
    """(equal within rtol 1e-5 / atol 1e-6, bit-equal, max abs difference)."""
    import torch

    if reference.keys() != found.keys():
        return False, False, float("inf")
    diff = max(float((reference[k] - found[k]).abs().max()) for k in reference)
    close = all(torch.allclose(found[k], reference[k], rtol=1e-5, atol=1e-6) for k in reference)
    return close, all(torch.equal(found[k], reference[k]) for k in reference), diff


def _state_after_kill(out: Path, old_adapter: str | None) -> dict[str, Any]:
    from lorakit import rundir

    weights = out / rundir.ADAPTER_WEIGHTS
    top = rundir.sha256_file(weights) if weights.is_file() else None
    return {
        "checkpoints": [
            rundir.checkpoint_step(p) for p in rundir.list_checkpoints(out / rundir.CHECKPOINTS_DIR)
        ],
        "old_adapter_posing": old_adapter is not None and top == old_adapter,
        "top_adapter": top is not None,
    }


def trial(
    point: str, model_dir: str, data: str, work: Path, reference: dict[str, Any], *, kill_after=None
) -> dict:
    """Kill one run at ``point`` (or after ``kill_after`` seconds), resume it, compare: one table row."""
    from lorakit import rundir
    from lorakit.errors import ConfigError

    out = work / point.replace(":", "-")
    old = None
    if point.startswith("overwrite"):  # an older, finished run is in the directory
        run_child("none", model_dir, data, out, seed=99)
        old = rundir.sha256_file(out / rundir.ADAPTER_WEIGHTS)
    code = run_child(point, model_dir, data, out, overwrite=old is not None, kill_after=kill_after)
    row: dict[str, Any] = {"point": point, "killed": code == -signal.SIGKILL, **_state_after_kill(out, old)}
    if point.startswith("power-loss"):
        latest = rundir.list_checkpoints(out / rundir.CHECKPOINTS_DIR)[-1]
        (latest / rundir.OPTIMIZER_FILE).write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start = rundir.find_resume_checkpoint(out, True)
        except ConfigError:
            start = None
        if start is None:
            pipeline(model_dir, data).train(out, overwrite=True)
        else:
            pipeline(model_dir, data).train(out, resume=True)
    row["resumed_from"] = rundir.checkpoint_step(start) if start is not None else None
    skipped = (
        re.search(r"Skipping incomplete checkpoints \((.*)\); resuming", str(w.message)) for w in caught
    )
    row["skipped"] = [match.group(1) for match in skipped if match]
    row["equal"], row["bit_equal"], row["max_diff"] = compare(reference, adapter(out))
    rundir.check_artifacts(rundir.RunDir(out), rundir.read_run(out))  # the final run loads
    row["leftovers"] = sorted(
        p.name for p in out.iterdir() if p.name in (rundir.LOCK_FILE, rundir.REPLACED_DIR)
    ) + ([rundir.STAGING_DIR] if (out / rundir.CHECKPOINTS_DIR / rundir.STAGING_DIR).exists() else [])
    return row


def tiny_model(where: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model

    return build_tiny_model(where)


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kill point | killed | complete checkpoints left | resumed from | skipped | adapter equal | bit-equal "
        "| max diff | old adapter posing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['point']} | {'yes' if r['killed'] else 'no (finished)'} | {r['checkpoints']} | "
            f"{r['resumed_from'] if r['resumed_from'] is not None else 'start again'} | "
            f"{'; '.join(r['skipped']) or '-'} | {'yes' if r['equal'] else 'NO'} | "
            f"{'yes' if r['bit_equal'] else 'no'} | {r['max_diff']:.2e} | {'YES' if r['old_adapter_posing'] else 'no'} |"
        )
    equal = sum(r["equal"] for r in rows)
    lines.append(
        f"\n{len(rows)} kill points tried, {sum(r['killed'] for r in rows)} killed; final adapter equal "
        f"to the uninterrupted run's in {equal}/{len(rows)}; old adapter posing as new in "
        f"{sum(r['old_adapter_posing'] for r in rows)}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=",".join(NAMED_POINTS), help="comma-separated kill points")
    parser.add_argument("--timed", type=int, default=12, help="timed kills at random moments of a run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timed kills' moments")
    parser.add_argument("--model", help="a model directory (default: a tiny Llama built here)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-faults-"))
    model_dir = args.model or tiny_model(work / "tiny-llama")
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    started = time.monotonic()
    run_child("none", model_dir, str(data), work / "reference")
    duration = time.monotonic() - started
    reference = adapter(work / "reference")
    rows = []
    points = [p for p in args.points.split(",") if p]
    moments = random.Random(args.seed)
    for index in range(args.timed):
        points.append(f"timed:{moments.uniform(0.35, 1.0) * duration:.1f}s#{index}")
    for point in points:
        kill_after = float(point.split(":")[1].split("s")[0]) if point.startswith("timed") else None
        rows.append(
            trial(
                point if kill_after is None else "none",
                model_dir,
                str(data),
                work / point.replace("#", "-"),
                reference,
                kill_after=kill_after,
            )
            | {"point": point}
        )
        print(json.dumps(rows[-1]), flush=True)
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        point, model_dir, data, out, overwrite, seed = sys.argv[2:8]
        child_main(point, model_dir, data, out, overwrite == "1", int(seed))
    else:
        main()

"""Multi-process faults on torchrun elastic: SIGKILL a worker of a 2-process CPU (gloo) run, and a 2-node rehearsal.

Every run is ``lorakit train CONFIG --num-processes N [--nnodes 2 ...] --max-restarts 1`` in a subprocess, on a
tiny Llama built here (no network). A fault is a real ``SIGKILL`` sent by this script to one worker process
(found through a pid file each worker writes at start-up) when the run reaches a point: a complete checkpoint
on disk, a checkpoint being staged, or the first seconds of the run (before any checkpoint). The launcher
restarts the group once; the new workers resume from the last complete checkpoint (or start over when there is
none). Each final adapter is compared with an uninterrupted 2-process run.

    PYTHONPATH=. python scripts/multiproc_faults.py            # all kill points + the 2-node rehearsal
    PYTHONPATH=. python scripts/multiproc_faults.py --quick    # one kill point

tests/test_multiproc_faults.py runs one kill point and the rehearsal through the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Say hello.", "output": "hello world"},
    {"instruction": "Route this ticket: I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket: my parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "output": "0 1 2"},
    {"instruction": "Name a colour.", "output": "brown"},
    {"instruction": "How are you?", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "output": "the lazy dog"},
]
STEPS, EVERY = 6, 2

# Each worker of the first attempt writes its pid, so the script can SIGKILL exactly one of them.
PID_HOOK = textwrap.dedent(
    """
    import os
    if "RANK" in os.environ and os.environ.get("LORAKIT_FAULT_PIDS"):
        _name = f"rank{os.environ['RANK']}-attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        with open(os.path.join(os.environ["LORAKIT_FAULT_PIDS"], _name), "w") as _handle:
            _handle.write(str(os.getpid()))
    """
)


def make_tiny_model(path: Path) -> Path:
    """The tests' 2-layer Llama (hidden 64) and locally trained tokenizer, saved to ``path``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import build_tiny_model

    build_tiny_model(path)
    return path


def write_config(model_dir: str | Path, path: Path) -> Path:
    """A 2 x 4 (global batch 8) run of STEPS steps with a checkpoint every EVERY steps, as a config file."""
    import lorakit as lk

    pipe = (
        lk.Pipeline.from_model(str(model_dir))
        .with_lora(r=4, dropout=0.0, targets=("q_proj", "v_proj"))
        .with_dataset(ROWS, template="alpaca", val_split=0, max_length=64, cache=False)
        .with_training(
            max_steps=STEPS, batch_size=4, lr=5e-3, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
        )
        .with_checkpoints(every=EVERY, keep=STEPS, best_metric=None, load_best=False)
    )
    return pipe.save_config(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(
    config: Path, out: Path, processes: int, restarts: int, node: tuple[int, int] | None
) -> list[str]:
    command = [sys.executable, "-m", "lorakit.cli", "train", str(config), "--output", str(out)]
    command += ["--num-processes", str(processes), "--max-restarts", str(restarts)]
    if node is not None:
        rank, port = node
        command += ["--nnodes", "2", "--machine-rank", str(rank)]
        command += ["--main-process-ip", "127.0.0.1", "--main-process-port", str(port)]
    return command


def _environment(scratch: Path) -> dict[str, str]:
    hooks, pids = scratch / "hooks", scratch / "pids"
    hooks.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(PID_HOOK)
    paths = [str(hooks), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": ":".join(p for p in paths if p),
        "LORAKIT_FAULT_PIDS": str(pids),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LORAKIT_PROGRESS": "0",
        "WANDB_MODE": "disabled",
    }


def complete_checkpoints(out: Path) -> list[int]:
    from lorakit.rundir import CHECKPOINTS_DIR, checkpoint_step, list_checkpoints

    return [checkpoint_step(p) for p in list_checkpoints(out / CHECKPOINTS_DIR)]


def _reached(point: str, out: Path, started: float) -> bool:
    """``"ckpt-N"``: checkpoint N is complete; ``"staging"``: a checkpoint is being written aside;
    ``"start+S"``: S seconds after the worker started (before any checkpoint)."""
    from lorakit.rundir import CHECKPOINTS_DIR, STAGING_DIR

    if point.startswith("ckpt-"):
        return int(point[5:]) in complete_checkpoints(out)
    if point == "staging":
        return (out / CHECKPOINTS_DIR / STAGING_DIR).is_dir()
    return time.monotonic() - started >= float(point.split("+")[1])


def run(
    config: Path,
    out: Path,
    *,
    processes: int = 2,
    restarts: int = 1,
    kill: tuple[int, str] | None = None,
    node: tuple[int, int] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """One launch of ``lorakit train``; with ``kill=(rank, point)``, SIGKILL that worker when the run reaches
    ``point``. Returns the exit code, output, the checkpoints complete at the kill, and whether it landed."""
    scratch = out.parent / f"{out.name}-scratch"
    env = _environment(scratch)
    log = (scratch / "log.txt").open("w")
    proc = subprocess.Popen(_command(config, out, processes, restarts, node), env=env, stdout=log, stderr=log)
    result: dict[str, Any] = {"kill": kill, "killed": False, "complete_at_kill": None}
    pid_file = scratch / "pids" / f"rank{kill[0]}-attempt0" if kill else None
    deadline, started = time.monotonic() + timeout, None
    while proc.poll() is None and kill and not result["killed"] and time.monotonic() < deadline:
        if started is None and pid_file.is_file() and pid_file.read_text():
            started = time.monotonic()
        if started is not None and _reached(kill[1], out, started):
            result["complete_at_kill"] = complete_checkpoints(out)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            result["killed"] = True
        time.sleep(0.005)
    result["code"] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    log.close()
    result["output"] = (scratch / "log.txt").read_text()
    result["restarted"] = (scratch / "pids" / "rank0-attempt1").is_file()
    return result


def rehearse_two_nodes(config: Path, out: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Two launchers on this machine, one process each, joined by a c10d rendezvous on localhost."""
    port = free_port()
    scratch = out.parent / f"{out.name}-scratch"
    env = _environment(scratch)
    procs, logs = [], []
    for rank in (0, 1):
        logs.append((scratch / f"node{rank}.txt").open("w"))
        command = _command(config, out, 1, 0, (rank, port))
        procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=logs[-1]))
    results = []
    for rank, proc in enumerate(procs):
        code = proc.wait(timeout=timeout)
        logs[rank].close()
        results.append({"code": code, "output": (scratch / f"node{rank}.txt").read_text()})
    return results


def adapter_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two adapters' tensors (they must have the same names)."""
    from safetensors.torch import load_file

    first, second = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    if first.keys() != second.keys():
        raise AssertionError(f"different adapter tensors: {sorted(first)} vs {sorted(second)}")
    return max(float((first[name] - second[name]).abs().max()) for name in first)


KILL_POINTS = [
    (1, "ckpt-2"),  # a worker dies mid-run, checkpoint 2 complete: resume from it
    (0, "ckpt-4"),  # the writing rank dies after checkpoint 4: resume from it
    (0, "staging"),  # rank 0 dies while a checkpoint is written aside: resume from the previous complete one
    (1, "start+3"),  # a worker dies before any checkpoint: the group starts the run again
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="one kill point and the rehearsal")
    args = parser.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="lorakit-faults-"))
    model = make_tiny_model(work / "tiny-llama")
    config = write_config(model, work / "run.yaml")
    t0 = time.monotonic()
    baseline = run(config, work / "baseline")
    print(f"uninterrupted 2-process run: exit {baseline['code']} ({time.monotonic() - t0:.0f} s)", flush=True)
    if baseline["code"] != 0:
        print(baseline["output"])
        return 1
    failures = 0
    rows = [
        "| kill | rank | complete checkpoints at the kill | restarted | exit | max abs diff vs uninterrupted |"
    ]
    rows.append("|---|---|---|---|---|---|")
    for index, (rank, point) in enumerate(KILL_POINTS[:1] if args.quick else KILL_POINTS):
        t0 = time.monotonic()
        result = run(config, work / f"kill{index}", kill=(rank, point))
        diff = adapter_difference(work / "baseline", work / f"kill{index}") if result["code"] == 0 else None
        ok = (
            result["code"] == 0
            and result["killed"]
            and result["restarted"]
            and diff is not None
            and diff < 1e-5
        )
        failures += not ok
        rows.append(
            f"| {point} | {rank} | {result['complete_at_kill']} | {result['restarted']} | {result['code']} | "
            f"{diff if diff is not None else '-'} |"
        )
        print(rows[-1], f"({time.monotonic() - t0:.0f} s){'' if ok else ' FAILED'}", flush=True)
        if not ok:
            print(result["output"][-4000:])
    t0 = time.monotonic()
    nodes = rehearse_two_nodes(config, work / "two-nodes")
    codes = [r["code"] for r in nodes]
    diff = adapter_difference(work / "baseline", work / "two-nodes") if codes == [0, 0] else None
    ok = diff is not None and diff < 1e-5
    failures += not ok
    rows.append(f"| (no kill) 2 nodes x 1 process, c10d on localhost | - | - | - | {codes} | {diff} |")
    print(rows[-1], f"({time.monotonic() - t0:.0f} s){'' if ok else ' FAILED'}", flush=True)
    print("\n".join(rows))
    print(json.dumps({"kill_points": len(rows) - 3, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

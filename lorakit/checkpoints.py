"""Checkpoints that survive crashes and the checks that let a run resume from one.

Layout inside a run directory::

    <run>/checkpoints/checkpoint-<step>/      adapter, optimizer, scheduler, RNG states, trainer_state.json,
                                              lorakit_method_state.safetensors (the method's own state,
                                              saved by its resume_state hook; optional),
                                              lorakit_resume.json (config + data fingerprint; written last)
    <run>/checkpoints/.partial/               a checkpoint being written; renamed into place when complete

A checkpoint is written into ``.partial/`` and renamed to ``checkpoint-<step>`` only when every file is there,
so a crash (even SIGKILL) in the middle of a save leaves the previous checkpoint complete and the newest
``checkpoint-*`` directory always usable for ``train(dir, resume=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.run import write_json_atomic

__all__ = [
    "CHECKPOINTS_DIR",
    "METHOD_STATE_FILE",
    "RESUME_FILE",
    "check_resume",
    "checkpoint_step",
    "commit_checkpoint",
    "data_fingerprint",
    "find_resume_checkpoint",
    "list_checkpoints",
    "prepare_resume",
    "read_method_state",
    "resume_meta",
    "write_method_state",
    "write_resume_record",
]

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".partial"
RESUME_FILE = "lorakit_resume.json"
STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "lorakit_method_state.safetensors"
# Config sections that do not change what is trained; they may differ between a run and its resumption.
_FREE_SECTIONS = ("tracking", "evaluation", "samples", "checkpoints", "early_stop")
_FREE_DATA_FIELDS = ("source", "val", "cache", "num_proc")


# --- resume ---------------------------------------------------------------------------------------------


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 of the tokenized training rows: every column's values and row lengths, in order (independent
    of how Arrow chunks or types the integers)."""
    import numpy as np
    import pyarrow as pa

    digest = hashlib.sha256()
    columns = sorted(dataset.column_names)
    digest.update(json.dumps([columns, len(dataset)]).encode())
    table = dataset.with_format("arrow")[:]  # the rows as shown (a selected / shuffled view included)
    for column in columns:
        array = table.column(column).combine_chunks()
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            digest.update(np.asarray(array.value_lengths().fill_null(0), dtype=np.int64).tobytes())
            digest.update(
                np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes()
            )
        else:
            digest.update(json.dumps(array.to_pylist(), default=str).encode())
    return digest.hexdigest()


def comparable_config(pipeline: Any) -> dict[str, Any]:
    """The parts of the pipeline config that decide the training trajectory."""
    config = pipeline.to_config()
    for section in _FREE_SECTIONS:
        config.pop(section, None)
    if config.get("data"):
        for field in _FREE_DATA_FIELDS:
            config["data"].pop(field, None)  # the rows themselves are compared by fingerprint
    return json.loads(json.dumps(config, default=str))


def resume_meta(pipeline: Any, train_dataset: Any) -> dict[str, Any]:
    """What a checkpoint records so a resumption can check it continues the same run."""
    return {
        "config": comparable_config(pipeline),
        "data_fingerprint": data_fingerprint(train_dataset),
        "train_rows": len(train_dataset),
    }


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` directory (-1 when the name has none)."""
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.glob("checkpoint-*")
        if p.is_dir() and checkpoint_step(p) >= 0 and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(output_dir: Path, resume: bool | str | Path) -> Path:
    """The checkpoint to resume from: the latest in ``output_dir`` (``resume=True``) or the given one."""
    if resume is True:
        where = output_dir / CHECKPOINTS_DIR
    else:
        where = Path(str(resume)).expanduser()
        if (where / STATE_FILE).is_file():
            return where
        if (where / CHECKPOINTS_DIR).is_dir():
            where = where / CHECKPOINTS_DIR
        elif not where.is_dir():
            raise ConfigError(
                f"train(resume={str(resume)!r}): no such directory. Pass a checkpoint directory "
                "(…/checkpoints/checkpoint-<step>), a run directory, or resume=True."
            )
    found = list_checkpoints(where)
    if not found:
        raise ConfigError(
            f"train(resume=...): no complete checkpoint in {where}. Checkpoints are written by "
            ".with_checkpoints(every=N) (or with_training(save_steps=N)); start a new run without resume."
        )
    return found[-1]


def _diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        lines = []
        for key in sorted(set(saved) | set(now), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                lines.append(f"{where}: {saved[key]!r} in the checkpoint, not set now")
            elif key not in saved:
                lines.append(f"{where}: not set in the checkpoint, {now[key]!r} now")
            else:
                lines.extend(_diff(saved[key], now[key], where))
        return lines
    if saved != now:
        return [f"{prefix}: {saved!r} in the checkpoint, {now!r} now"]
    return []


def check_resume(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Raise ConfigError listing every difference between the checkpoint's run and this one; return the
    checkpoint's record."""
    path = checkpoint / RESUME_FILE
    if not path.is_file():
        raise ConfigError(
            f"Cannot resume from {checkpoint}: it has no {RESUME_FILE}, so lorakit cannot check that it belongs "
            "to this pipeline and data. Resume only from checkpoints written by lorakit."
        )
    saved = json.loads(path.read_text())
    differences = _diff(saved.get("config"), meta["config"])
    if saved.get("data_fingerprint") != meta["data_fingerprint"]:
        differences.append(
            f"training data: the tokenized rows differ ({saved.get('train_rows')} rows, fingerprint "
            f"{str(saved.get('data_fingerprint'))[:12]} in the checkpoint; {meta['train_rows']} rows, "
            f"fingerprint {meta['data_fingerprint'][:12]} now)"
        )
    if differences:
        raise ConfigError(
            f"Cannot resume from {checkpoint}: this run differs from the one that wrote it:\n  - "
            + "\n  - ".join(differences)
            + "\nResume with the same pipeline and data, or start a new run in another directory."
        )
    return saved


# --- writing a checkpoint -------------------------------------------------------------------------------


def write_resume_record(checkpoint: Path, record: dict[str, Any]) -> None:
    """Write the checkpoint's resume record (the last file of a checkpoint)."""
    write_json_atomic(checkpoint / RESUME_FILE, record)


def write_method_state(checkpoint: Path, tensors: dict[str, Any], info: dict[str, Any]) -> None:
    """Save a method's resume state: tensors as safetensors, ``info`` as JSON in the file's metadata."""
    from safetensors.torch import save_file

    tmp = checkpoint / f".{METHOD_STATE_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, checkpoint / METHOD_STATE_FILE)


def read_method_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tensors, info)`` saved by :func:`write_method_state`, or None when the checkpoint has none."""
    from safetensors import safe_open

    path = checkpoint / METHOD_STATE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    return tensors, json.loads(metadata.get("info", "{}"))


def commit_checkpoint(staged: Path, final: Path) -> None:
    """Rename a complete staged checkpoint into place (replacing an older save of the same step)."""
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = staged.parent / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # only when empty


def clean_staging(checkpoint_dir: Path) -> None:
    """Remove what a crash left half-written."""
    staging = checkpoint_dir / STAGING_DIR
    if staging.exists():
        warnings.warn(f"Removing the incomplete checkpoint left by a crash: {staging}", stacklevel=2)
        shutil.rmtree(staging, ignore_errors=True)


# --- run-directory housekeeping -------------------------------------------------------------------------

RUN_OUTPUTS = ("samples.jsonl", "report.md", "curves.png")
"""Files a run writes besides the adapter and metrics; a fresh run removes stale ones."""


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """A fresh run (``overwrite=True``) must not rotate or resume the previous run's checkpoints."""
    if checkpoint_dir.is_dir():
        shutil.rmtree(checkpoint_dir)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log up to ``step``: the resumed run logs the later steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if int(entry.get("step", 0)) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def prepare_resume(output_dir: Path, checkpoint: Path) -> None:
    """Before resuming: drop what a crash left half-written and log lines past the checkpoint."""
    clean_staging(checkpoint.parent)
    step = checkpoint_step(checkpoint)
    for name in ("metrics.jsonl", "samples.jsonl"):
        _truncate_log(output_dir / name, step)
    for name in ("metrics.json", "report.md", "curves.png"):
        (output_dir / name).unlink(missing_ok=True)

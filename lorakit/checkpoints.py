"""Checkpoints a run can resume from: what a checkpoint records about its run, the checks that let a resumption
continue it, and the method's own resume state.

Where checkpoints live, their names and how one is published atomically (written aside, renamed into place
when complete, so a crash, even SIGKILL, in the middle of a save leaves the previous checkpoint complete) are
:mod:`lorakit.rundir`'s; the resume record is a checkpoint's last file, so a checkpoint with it is complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lorakit import rundir as rd
from lorakit.errors import ConfigError

__all__ = [
    "check_resume",
    "comparable_config",
    "data_fingerprint",
    "read_method_state",
    "resume_meta",
    "write_method_state",
    "write_resume_record",
]

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
    path = checkpoint / rd.RESUME_FILE
    if not path.is_file():
        raise ConfigError(
            f"Cannot resume from {checkpoint}: it has no {rd.RESUME_FILE}, so lorakit cannot check that it belongs "
            "to this pipeline and data. Resume only from checkpoints written by lorakit."
        )
    saved = rd.read_json(path)
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
    rd.write_json_atomic(checkpoint / rd.RESUME_FILE, record)


def write_method_state(checkpoint: Path, tensors: dict[str, Any], info: dict[str, Any]) -> None:
    """Save a method's resume state: tensors as safetensors, ``info`` as JSON in the file's metadata."""
    from safetensors.torch import save_file

    with rd.atomic_target(checkpoint / rd.METHOD_STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})


def read_method_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tensors, info)`` saved by :func:`write_method_state`, or None when the checkpoint has none."""
    from safetensors import safe_open

    path = checkpoint / rd.METHOD_STATE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    return tensors, json.loads(metadata.get("info", "{}"))

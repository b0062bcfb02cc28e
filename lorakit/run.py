"""The run directory: one place for everything a run produced, readable without lorakit where possible.

Layout::

    <run>/adapter_config.json        PEFT adapter (peft.PeftModel.from_pretrained(base, <run>) loads it)
    <run>/adapter_model.safetensors
    <run>/tokenizer.json ...         the tokenizer used in training (pad token included)
    <run>/lorakit_run.json           pipeline config, resolved base path, template, data report, versions
    <run>/metrics.json               final metrics (train / eval loss, eval perplexity, runtime, ...)
    <run>/metrics.jsonl              every logged step, one JSON object per line
    <run>/data/source.jsonl          in-memory training rows (only when the source was not a file)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

__all__ = ["RUN_FILE", "METRICS_FILE", "METRICS_LOG", "read_run", "write_json_atomic"]

RUN_FILE = "lorakit_run.json"
METRICS_FILE = "metrics.json"
METRICS_LOG = "metrics.jsonl"
ADAPTER_CONFIG = "adapter_config.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON aside and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``lorakit_run.json`` of a run directory, or None for a plain PEFT adapter directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a directory; pass a lorakit run directory or a PEFT adapter directory."
        )
    path = run_dir / RUN_FILE
    if not path.is_file():
        if not (run_dir / ADAPTER_CONFIG).is_file():
            raise ConfigError(
                f"{run_dir} holds neither {RUN_FILE} (a lorakit run) nor {ADAPTER_CONFIG} (a PEFT adapter)."
            )
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); the run directory is damaged.") from error


def check_output_dir(path: Path, *, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train({str(path)!r}): a file is in the way; pass a directory path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"train({str(path)!r}): the directory is not empty. Pick a new directory, or pass overwrite=True "
            "to replace the run in it."
        )

"""Provenance: which base model an adapter was trained on, so it is never served on another one silently.

``train()`` writes ``lorakit_provenance.json`` next to the adapter::

    {"base_model": "meta-llama/Llama-3.2-1B", "base_model_path": "...", "config_fingerprint": "3f2a..."}

The fingerprint is a SHA-256 of the base model's ``config.json`` with the keys that do not change the
weights' meaning removed (dtype, transformers version, paths, cache / quantization settings), so a local copy
of the same checkpoint matches and another architecture or size does not. Loading the adapter onto a base
with another fingerprint raises :class:`~lorakit.errors.ConfigError` unless ``allow_base_mismatch=True``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

__all__ = ["PROVENANCE_FILE", "check_base", "config_fingerprint", "read_provenance", "write_provenance"]

PROVENANCE_FILE = "lorakit_provenance.json"

_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "quantization_config",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def config_fingerprint(config: Any) -> str:
    """SHA-256 (hex, first 16 characters) of a model config dict or ``PretrainedConfig``, volatile keys removed."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {key: value for key, value in data.items() if key not in _VOLATILE}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_fingerprint(base_path: str, spec: Any) -> str:
    """The fingerprint of a base model, read from its config without loading weights."""
    path = Path(base_path) / "config.json"
    if path.is_file():
        return config_fingerprint(json.loads(path.read_text()))
    from lorakit.models import load_model_config

    return config_fingerprint(load_model_config(spec))


def write_provenance(output_dir: Path, spec: Any, base_path: str) -> dict[str, Any]:
    """Record the base model id, its resolved path and its config fingerprint in the run directory."""
    from lorakit.run import write_json_atomic

    record = {
        "base_model": spec.name_or_path,
        "base_model_path": base_path,
        "revision": spec.revision,
        "config_fingerprint": base_fingerprint(base_path, spec),
    }
    write_json_atomic(Path(output_dir) / PROVENANCE_FILE, record)
    return record


def read_provenance(adapter_dir: Path) -> dict[str, Any] | None:
    """The provenance record of an adapter directory, or None (adapters trained elsewhere have none)."""
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); the run directory is damaged.") from error


def check_base(
    adapter_dir: Path, base_name: str, base_path: str, spec: Any, *, allow_base_mismatch: bool = False
) -> None:
    """Raise ConfigError if the adapter in ``adapter_dir`` was trained on another base than ``base_path``.

    A different config fingerprint is an error (a warning with ``allow_base_mismatch=True``); the same
    fingerprint under another name (a local copy, or a sibling checkpoint of the same architecture) is silent,
    as the weights' shapes and meaning agree.
    """
    record = read_provenance(adapter_dir)
    if record is None or not record.get("config_fingerprint"):
        return
    found = base_fingerprint(base_path, spec)
    if found == record["config_fingerprint"]:
        return
    message = (
        f"The adapter in {adapter_dir} was trained on {record.get('base_model')!r} (config fingerprint "
        f"{record['config_fingerprint']}), but the base model given is {base_name!r} (fingerprint {found}): "
        "another architecture, size or configuration."
    )
    if allow_base_mismatch:
        warnings.warn(message + " Loading it anyway (allow_base_mismatch=True).", stacklevel=3)
        return
    raise ConfigError(
        message + f" Load it onto {record.get('base_model')!r}, or pass allow_base_mismatch=True if you are "
        "sure the adapter fits this base."
    )

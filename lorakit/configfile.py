"""Pipeline config files: YAML or JSON, and ``key=value`` overrides (``lorakit train cfg.yaml --set ...``).

A config file holds what :meth:`lorakit.Pipeline.to_config` returns, or only the sections you need::

    model: {name_or_path: meta-llama/Llama-3.2-1B-Instruct}
    method: {name: lora, r: 16, alpha: 32, targets: all-linear}
    data: {source: data/train.jsonl, template: llama3, val_split: 0.1}
    training: {epochs: 3, lr: 2.0e-4, batch_size: 4}

Relative data paths are relative to the working directory (like every path on the command line).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.rundir import RUN_FILE

__all__ = [
    "YAML_SUFFIXES",
    "apply_overrides",
    "check_remote_code",
    "config_file_path",
    "read_config_file",
    "write_config_file",
]

YAML_SUFFIXES = (".yaml", ".yml")


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - PyYAML is a dependency
        raise MissingDependencyError("YAML configs need PyYAML: pip install pyyaml") from error
    return yaml


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config dict from a ``.yaml`` / ``.yml`` / ``.json`` file, or a run directory's ``lorakit_run.json``.

    Raises:
        ConfigError: the file is missing or not valid YAML / JSON, or does not hold a mapping.
    """
    path = config_file_path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"Cannot read pipeline config {path}: {error.strerror or error}.") from error
    if path.suffix.lower() in YAML_SUFFIXES:
        yaml = _yaml()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"Cannot read pipeline config {path}: not valid JSON ({error}). YAML files need a .yaml suffix."
            ) from error
    if not isinstance(loaded, Mapping):
        raise ConfigError(
            f"{path} must hold a mapping of config sections (model, method, data, ...), got {type(loaded).__name__}."
        )
    return dict(loaded.get("pipeline", loaded))


def config_file_path(path: str | Path) -> Path:
    """The file a config path names: the path itself, or a run directory's ``lorakit_run.json``."""
    path = Path(path).expanduser()
    return path / RUN_FILE if path.is_dir() else path


def check_remote_code(config: Mapping[str, Any], *, source: str, trust_remote_code: bool) -> None:
    """Refuse a config whose model section sets ``trust_remote_code: true`` unless the caller opted in.

    Loading such a model imports and runs Python files shipped with it (its ``auto_map``); a config file alone
    must not be enough for that. ``source`` names where the config came from, for the message.

    Raises:
        ConfigError: the model section asks for remote code and ``trust_remote_code`` is False.
    """
    model = config.get("model")
    if trust_remote_code or not isinstance(model, Mapping) or not model.get("trust_remote_code"):
        return
    raise ConfigError(
        f"{source} sets trust_remote_code: true for model {model.get('name_or_path')!r}: loading it would run "
        "Python code shipped with that model. Only for a model you trust, opt in with "
        "Pipeline.from_config(..., trust_remote_code=True) or the CLI flag --trust-remote-code."
    )


def write_config_file(path: str | Path, config: Mapping[str, Any]) -> Path:
    """Write a config dict as YAML (``.yaml`` / ``.yml``) or JSON (any other suffix)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in YAML_SUFFIXES:
        path.write_text(_yaml().safe_dump(dict(config), sort_keys=False, allow_unicode=True))
    else:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return path


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``section.field=value`` pairs (values parsed as YAML: ``3``, ``2e-4``, ``true``, ``[q_proj, v_proj]``).

    ``model=path`` (a section given a plain value) is shorthand for ``model.name_or_path=path``; ``method.name``
    switches the method. Returns a new dict; the input is not changed.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    result = json.loads(json.dumps(config, default=str))  # a deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r}: expected section.field=value, e.g. --set training.lr=1e-4 or --set model=./my-model."
            )
        value = _parse_value(raw)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) == 1 and parts[0] == "model" and isinstance(value, str):
            parts = ["model", "name_or_path"]
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


def _parse_value(raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null", "~"):
        return None
    yaml = _yaml()
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # not YAML ("a: b: c", "2024-13-45"): the text itself is the value
        return raw
    if isinstance(value, str):
        try:
            return float(text) if any(c.isdigit() for c in text) else raw  # YAML 1.1 reads 2e-4 as text
        except ValueError:
            return raw
    return raw if value is None else value

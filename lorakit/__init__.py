"""lorakit: parameter-efficient fine-tuning of open LLMs that is short to write and hard to get wrong.

``import lorakit`` is light: torch, transformers, trl and peft load only when a pipeline trains, plans or
an InferenceModel loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError, DataError, LorakitError, MissingDependencyError

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigError",
    "DataError",
    "InferenceModel",
    "LorakitError",
    "MissingDependencyError",
    "Pipeline",
    "TrainResult",
    "__version__",
    "evaluate",
    "preference_sample_path",
]

_LAZY = {
    "Pipeline": "lorakit.pipeline",
    "InferenceModel": "lorakit.inference",
    "TrainResult": "lorakit.training",
    "evaluate": "lorakit.evaluation",
    "preference_sample_path": "lorakit.data.preference",
}

if TYPE_CHECKING:
    from lorakit.data.preference import preference_sample_path
    from lorakit.evaluation import evaluate
    from lorakit.inference import InferenceModel
    from lorakit.pipeline import Pipeline
    from lorakit.training import TrainResult


def __getattr__(name: str) -> Any:
    if name in (
        "metrics",
        "evaluation",
        "tracking",
        "checkpoints",
    ):  # subpackages, importable on attribute access
        import importlib

        return importlib.import_module(f"lorakit.{name}")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

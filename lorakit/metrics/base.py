"""The metric Protocol, the registry of named metrics and the helpers every metric module shares.

:mod:`lorakit.metrics` (lookup and :func:`~lorakit.metrics.compute`) and :mod:`lorakit.metrics.builtin` (the
built-in metrics) both build on this module, so neither imports the other's half.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lorakit.errors import ConfigError

__all__ = [
    "METRICS",
    "Metric",
    "check_texts",
    "flatten",
    "metric_name",
    "perplexity_from_loss",
    "register_metric",
]


@runtime_checkable
class Metric(Protocol):
    """What every metric implements.

    ``needs`` says what ``compute`` reads: ``"text"`` metrics get ``predictions`` (strings) and ``references``
    (a list of reference strings per prediction); ``"loss"`` metrics get ``loss`` (mean negative
    log-likelihood per trained token, in nats: lorakit's one loss, defined in :mod:`lorakit.metrics.loss`).
    """

    name: str
    """The name results are reported under."""
    needs: str
    """``"text"`` or ``"loss"``."""

    @property
    def compute(self) -> Callable[..., dict[str, float]]:
        """``compute(predictions=, references=)`` or ``compute(loss=)`` -> a flat dict of numbers."""
        ...


METRICS: dict[str, Callable[..., Metric]] = {}
"""The built-in metrics by name: each value builds the metric (keyword options allowed)."""


def register_metric(name: str, factory: Callable[..., Metric]) -> None:
    """Add a named metric; ``compute([name], ...)`` then finds it. Names must be new."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_metric(): the name must be a non-empty string, got {name!r}.")
    if name in METRICS:
        raise ConfigError(f"register_metric(): a metric named {name!r} already exists; pick another name.")
    METRICS[name] = factory


def metric_name(spec: Any) -> str:
    """The name a metric spec is stored under in configs (a name, a path or ``"module:function"``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Path):
        return str(spec)
    module, qualname = getattr(spec, "__module__", None), getattr(spec, "__qualname__", None)
    if callable(spec) and module and qualname and "<" not in qualname:
        return f"{module}:{qualname}"
    name = getattr(spec, "name", None)
    return name if isinstance(name, str) else repr(spec)


def check_texts(predictions: Any, references: Any) -> tuple[list[str], list[list[str]]]:
    """Validate predictions / references; each reference becomes a list (one or more references)."""
    if predictions is None or references is None:
        raise ConfigError(
            "Text metrics need predictions= and references= (lists of strings of equal length)."
        )
    if isinstance(predictions, str) or isinstance(references, str):
        raise ConfigError("predictions= and references= must be lists of strings, not a single string.")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ConfigError(
            f"predictions has {len(predictions)} items but references has {len(references)}; they must pair up."
        )
    if not predictions:
        raise ConfigError("predictions= is empty: there is nothing to score.")
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ConfigError(f"predictions[{index}] must be a string, got {type(prediction).__name__}.")
    refs: list[list[str]] = []
    for index, reference in enumerate(references):
        group = [reference] if isinstance(reference, str) else list(reference)
        if not group or not all(isinstance(r, str) for r in group):
            raise ConfigError(
                f"references[{index}] must be a string or a non-empty list of strings, got {reference!r}."
            )
        refs.append(group)
    return predictions, refs


def flatten(value: Any, name: str = "") -> dict[str, float]:
    """A metric result as flat ``{key: float}``: a number becomes ``{name: number}``, a dict keeps its keys
    (nested dicts join keys with ``_``), lists get an index; strings and None are left out."""
    import numbers

    if isinstance(value, (bool, numbers.Number)):
        return {name: float(value)}  # type: ignore[arg-type]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return {name: float(value.item())}
    flat: dict[str, float] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            flat.update(flatten(item, f"{name}_{key}" if name else str(key)))
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{name}_{index}"))
    return flat


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so a diverged model gives a huge finite number, not inf."""
    return float(math.exp(min(float(loss), 50.0)))

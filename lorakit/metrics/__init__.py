"""Metric modules behind one protocol, computed offline.

Text metrics compare generated ``predictions`` with ``references``; the loss metric (``perplexity``) turns a
token-weighted mean negative log-likelihood into a number. :func:`compute` runs several and returns one flat
dict of floats::

    import lorakit.metrics as lm

    lm.compute(["rouge", "bleu", "exact_match"],
               predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])
    # {'rouge1': 0.833..., 'rouge2': 0.6, 'rougeL': 0.833..., 'rougeLsum': 0.833..., 'bleu': 53.73...,
    #  'exact_match': 0.0}
    lm.compute(["perplexity"], loss=2.0)          # {'perplexity': 7.389...}

A metric is a built-in name (see :data:`METRICS`), any callable ``f(predictions, references) -> float | dict``,
an object implementing :class:`Metric`, a ``"package.module:function"`` string, or the path of a local
Hugging Face ``evaluate`` module (a ``.py`` script or its directory). The Hub is never contacted: ROUGE uses
``rouge-score`` (with stemming), BLEU and chrF use ``sacrebleu`` (corpus scores, 0-100); both come with
``pip install 'lorakit[metrics]'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lorakit.errors import ConfigError

__all__ = [
    "METRICS",
    "Metric",
    "compute",
    "get_metric",
    "metric_name",
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


def get_metric(spec: Any) -> Metric:
    """Turn a metric spec (name, callable, Metric object, ``"module:function"``, local evaluate path) into a
    :class:`Metric`."""
    from lorakit.metrics import builtin

    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, str):
        if spec in METRICS:
            return METRICS[spec]()
        if spec.endswith(".py") or "/" in spec or "\\" in spec or Path(spec).expanduser().exists():
            return builtin.EvaluateModule(spec)
        if ":" in spec:
            return builtin.CallableMetric(_import_callable(spec), name=spec.rsplit(":", 1)[1].split(".")[-1])
        raise ConfigError(
            f"Unknown metric {spec!r}. Built-in metrics: {', '.join(sorted(METRICS))}; or pass a callable "
            "f(predictions, references), a 'package.module:function' string, or the path of a local "
            "evaluate module."
        )
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return builtin.CallableMetric(spec)
    raise ConfigError(
        f"A metric must be a name, a callable or a Metric object, got {type(spec).__name__} ({spec!r})."
    )


def _import_callable(spec: str) -> Callable[..., Any]:
    import importlib

    module_name, _, attribute = spec.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"Metric {spec!r}: cannot import {attribute!r} from {module_name!r} ({error}). Use "
            "'package.module:function' with an importable function, or pass the function itself."
        ) from error
    if not callable(value):
        raise ConfigError(f"Metric {spec!r} is not callable.")
    return value


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


def compute(
    metrics: Sequence[Any] | Any,
    *,
    predictions: Sequence[str] | None = None,
    references: Sequence[str] | Sequence[Sequence[str]] | None = None,
    loss: float | None = None,
) -> dict[str, float]:
    """Run each metric and merge the results into one flat dict of floats.

    Args:
        metrics: a metric spec or a list of them (names from :data:`METRICS`, callables, Metric objects,
            ``"module:function"`` strings, local ``evaluate`` module paths).
        predictions: generated texts (text metrics).
        references: one reference string, or a list of references, per prediction (text metrics).
        loss: mean negative log-likelihood per token, in nats (``perplexity``).

    Raises:
        ConfigError: an unknown metric, missing or mismatched inputs, or two metrics producing the same key.
        MissingDependencyError: a built-in whose package is not installed (``pip install 'lorakit[metrics]'``).
    """
    if isinstance(metrics, (str, Path)) or not isinstance(metrics, Sequence):
        metrics = [metrics]
    resolved = [get_metric(spec) for spec in metrics]
    texts = None
    if any(m.needs == "text" for m in resolved):
        texts = check_texts(predictions, references)
    results: dict[str, float] = {}
    for metric in resolved:
        if metric.needs == "loss":
            if loss is None:
                raise ConfigError(
                    f"Metric {metric.name!r} needs loss= (mean negative log-likelihood per token); "
                    "lorakit.evaluate() and with_eval() compute it for you."
                )
            values = metric.compute(loss=loss)
        elif metric.needs == "text":
            assert texts is not None
            values = metric.compute(predictions=texts[0], references=texts[1])
        else:
            raise ConfigError(f"Metric {metric.name!r} has needs={metric.needs!r}; use 'text' or 'loss'.")
        for key, value in values.items():
            if key in results:
                raise ConfigError(
                    f"Two metrics produce the key {key!r}; give one of them another name (a custom metric is "
                    "named after its function)."
                )
            results[key] = float(value)
    return results


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so a diverged model gives a huge finite number, not inf."""
    return float(math.exp(min(float(loss), 50.0)))

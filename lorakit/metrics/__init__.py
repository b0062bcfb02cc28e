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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.metrics import builtin
from lorakit.metrics.base import (
    METRICS,
    Metric,
    check_texts,
    flatten,
    metric_name,
    perplexity_from_loss,
    register_metric,
)
from lorakit.metrics.builtin import INSTALL_HINT

__all__ = [
    "METRICS",
    "Metric",
    "check_texts",
    "compute",
    "flatten",
    "get_metric",
    "metric_name",
    "missing_packages",
    "perplexity_from_loss",
    "register_metric",
]


def get_metric(spec: Any) -> Metric:
    """Turn a metric spec (name, callable, Metric object, ``"module:function"``, local evaluate path) into a
    :class:`Metric`."""
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


def missing_packages(metrics: Sequence[Any]) -> list[str]:
    """One line per metric whose package is not installed (checked without importing it)."""
    from importlib.util import find_spec

    lines = []
    for spec in metrics:
        metric = get_metric(spec)
        for module, package in getattr(metric, "requires", ()):
            if find_spec(module) is None:
                lines.append(f"the {metric.name!r} metric needs {package}: {INSTALL_HINT}")
    return lines

"""The built-in metrics: perplexity, ROUGE, BLEU, chrF, exact match, label accuracy, and adapters for custom
callables and local ``evaluate`` modules. Heavy packages are imported inside ``compute``."""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.metrics.base import METRICS, flatten, perplexity_from_loss, register_metric

__all__ = [
    "Accuracy",
    "Bleu",
    "CallableMetric",
    "Chrf",
    "EvaluateModule",
    "ExactMatch",
    "Perplexity",
    "Rouge",
]

INSTALL_HINT = "pip install 'lorakit[metrics]'"


def _require(module: str, package: str, metric: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"The {metric!r} metric needs the {package} package, which is not installed: {INSTALL_HINT} "
            f"(or pip install {package})."
        ) from None


def _single_or_lists(references: list[list[str]]) -> list[str] | list[list[str]]:
    """What a custom metric receives: plain strings when every prediction has exactly one reference."""
    if all(len(group) == 1 for group in references):
        return [group[0] for group in references]
    return references


class Perplexity:
    """``exp(mean negative log-likelihood per trained token)``: needs the loss, not generated text."""

    name = "perplexity"
    needs = "loss"
    requires: tuple[tuple[str, str], ...] = ()

    def compute(self, *, loss: float, **_: Any) -> dict[str, float]:
        return {"perplexity": perplexity_from_loss(loss)}


class Rouge:
    """ROUGE-1/2/L/Lsum F-measure with Porter stemming (``rouge-score``), averaged over the examples.

    With several references per prediction the best-matching one counts (``RougeScorer.score_multi``). The
    result is the plain mean of the per-example F-measures (``evaluate``'s ``rouge`` reports a bootstrap
    estimate of the same mean, which differs from it only by resampling noise).
    """

    name = "rouge"
    needs = "text"
    requires = (("rouge_score", "rouge-score"),)
    types = ("rouge1", "rouge2", "rougeL", "rougeLsum")

    def __init__(self, use_stemmer: bool = True) -> None:
        self.use_stemmer = use_stemmer

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        _require("rouge_score", "rouge-score", "rouge")
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(self.types), use_stemmer=self.use_stemmer)
        totals = dict.fromkeys(self.types, 0.0)
        for prediction, group in zip(predictions, references, strict=True):
            scores = scorer.score_multi(group, prediction)
            for key in self.types:
                totals[key] += scores[key].fmeasure
        return {key: total / len(predictions) for key, total in totals.items()}


def _reference_streams(references: list[list[str]], metric: str) -> list[list[str]]:
    counts = {len(group) for group in references}
    if len(counts) != 1:
        raise ConfigError(
            f"{metric}: every prediction needs the same number of references (sacrebleu's corpus score), got "
            f"counts {sorted(counts)}."
        )
    return [list(stream) for stream in zip(*references, strict=True)]


class Bleu:
    """sacrebleu's corpus BLEU (0-100) with its defaults (13a tokenization, exponential smoothing)."""

    name = "bleu"
    needs = "text"
    requires = (("sacrebleu", "sacrebleu"),)

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        sacrebleu = _require("sacrebleu", "sacrebleu", "bleu")
        score = sacrebleu.corpus_bleu(predictions, _reference_streams(references, "bleu"))
        return {"bleu": float(score.score)}


class Chrf:
    """sacrebleu's corpus chrF (0-100; character n-grams up to 6, beta 2)."""

    name = "chrf"
    needs = "text"
    requires = (("sacrebleu", "sacrebleu"),)

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        sacrebleu = _require("sacrebleu", "sacrebleu", "chrf")
        score = sacrebleu.corpus_chrf(predictions, _reference_streams(references, "chrf"))
        return {"chrf": float(score.score)}


_SPACES = re.compile(r"\s+")
_EDGE_PUNCTUATION = string.punctuation + string.whitespace


def normalize(
    text: str, *, ignore_case: bool = True, strip_punctuation: bool = True, first_line: bool = False
) -> str:
    """Whitespace collapsed and trimmed; optionally case-folded, edge punctuation removed, first line only."""
    text = text.strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    text = _SPACES.sub(" ", text).strip()
    if strip_punctuation:
        text = text.strip(_EDGE_PUNCTUATION)
    return text.casefold() if ignore_case else text


class ExactMatch:
    """Share of predictions equal to one of their references after :func:`normalize` (0-1)."""

    name = "exact_match"
    needs = "text"
    requires: tuple[tuple[str, str], ...] = ()

    def __init__(
        self, ignore_case: bool = True, strip_punctuation: bool = True, first_line: bool = False
    ) -> None:
        self.options = {
            "ignore_case": ignore_case,
            "strip_punctuation": strip_punctuation,
            "first_line": first_line,
        }

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        hits = 0
        for prediction, group in zip(predictions, references, strict=True):
            wanted = {normalize(r, **self.options) for r in group}
            hits += normalize(prediction, **self.options) in wanted
        return {"exact_match": hits / len(predictions)}


class Accuracy:
    """Classification accuracy over a label set (0-1), for models that answer with a label.

    A prediction counts as the label it equals after :func:`normalize`; otherwise as the label that occurs
    first in it as whole words ("It goes to billing." -> ``billing``); otherwise as no label (wrong, and counted
    in ``accuracy_unmatched``). ``labels`` defaults to the distinct references.
    """

    name = "accuracy"
    needs = "text"
    requires: tuple[tuple[str, str], ...] = ()

    def __init__(self, labels: Sequence[str] | None = None) -> None:
        if labels is not None and (isinstance(labels, str) or not all(isinstance(x, str) for x in labels)):
            raise ConfigError(f"Accuracy(labels=...) must be a list of label strings, got {labels!r}.")
        self.labels = tuple(labels) if labels is not None else None

    def classify(self, text: str, labels: Sequence[str]) -> str | None:
        """The label a generated text stands for, or None."""
        said = normalize(text)
        if said in labels:
            return said
        found = [(m.start(), label) for label in labels if (m := re.search(rf"\b{re.escape(label)}\b", said))]
        return min(found)[1] if found else None

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        raw = self.labels if self.labels is not None else sorted({g[0] for g in references})
        labels = sorted({normalize(label) for label in raw}, key=len, reverse=True)
        hits = unmatched = 0
        for index, (prediction, group) in enumerate(zip(predictions, references, strict=True)):
            truth = normalize(group[0])
            if truth not in labels:
                raise ConfigError(
                    f"accuracy: references[{index}] is {group[0]!r}, which is not in the label set "
                    f"{list(raw)}; add it to labels=."
                )
            said = self.classify(prediction, labels)
            unmatched += said is None
            hits += said == truth
        n = len(predictions)
        return {"accuracy": hits / n, "accuracy_unmatched": unmatched / n}


class CallableMetric:
    """A user function ``f(predictions, references)`` returning a number or a dict of numbers.

    ``references`` is a list of strings (or of lists of strings when some prediction has several). A number
    is reported under the function's name; a dict keeps its keys.
    """

    needs = "text"
    requires: tuple[tuple[str, str], ...] = ()

    def __init__(self, function: Callable[..., Any], name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__name__", None) or type(function).__name__
        if self.name == "<lambda>":
            self.name = "custom"

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        result = self.function(list(predictions), _single_or_lists(references))
        flat = flatten(result) if isinstance(result, Mapping) else flatten(result, self.name)
        if not flat:
            raise ConfigError(
                f"Custom metric {self.name!r} returned {result!r}; it must return a number or a dict of numbers."
            )
        return flat


class EvaluateModule:
    """A Hugging Face ``evaluate`` module loaded from a local script (``path/to/name.py``) or its directory
    (``path/to/name/`` holding ``name.py``): nothing is fetched from the Hub."""

    needs = "text"
    requires = (("evaluate", "evaluate"),)

    def __init__(self, path: str, **compute_kwargs: Any) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ConfigError(
                f"Metric {path!r}: no such file or directory. Pass a built-in name ({', '.join(sorted(METRICS))}), "
                "or the path of a local evaluate module script (.py) or its directory."
            )
        script = self.path if self.path.is_file() else self.path / f"{self.path.name}.py"
        if script.suffix != ".py" or not script.is_file():
            raise ConfigError(
                f"Metric {path!r}: an evaluate module is a .py script, or a directory holding a script named after "
                f"it ({self.path.name}.py); found neither."
            )
        self.name = script.stem
        self.compute_kwargs = compute_kwargs
        self._module: Any = None

    def compute(self, *, predictions: list[str], references: list[list[str]], **_: Any) -> dict[str, float]:
        evaluate = _require("evaluate", "evaluate", self.name)
        if self._module is None:
            self._module = evaluate.load(str(self.path))
        result = self._module.compute(
            predictions=list(predictions), references=_single_or_lists(references), **self.compute_kwargs
        )
        return flatten(result) if isinstance(result, Mapping) else flatten(result, self.name)


for _name, _factory in (
    ("perplexity", Perplexity),
    ("rouge", Rouge),
    ("bleu", Bleu),
    ("chrf", Chrf),
    ("exact_match", ExactMatch),
    ("accuracy", Accuracy),
):
    if _name not in METRICS:
        register_metric(_name, _factory)

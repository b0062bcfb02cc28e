"""Evaluation: standalone (:func:`evaluate`) and during training (generation metrics, samples).

Memory stays bounded by the batch size, not by the size of the evaluation set: generation runs ``batch_size``
prompts at a time and keeps only the decoded strings; perplexity keeps two running sums (negative
log-likelihood and token count), never the logits of more than one batch::

    import lorakit as lk
    from lorakit.evaluation import compare

    before = lk.evaluate("smollm2-135m", "test.jsonl", metrics=["exact_match", "rouge"], template="alpaca")
    after = lk.evaluate("runs/support-bot", "test.jsonl", metrics=["exact_match", "rouge"])
    print(compare(before, after))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError, DataError

__all__ = ["EvalResult", "compare", "evaluate"]

IGNORE_INDEX = -100


@attrs.frozen
class EvalResult:
    """What :func:`evaluate` measured for one model: a one-row result table.

    ``str(result)`` (and ``result.to_markdown()``) renders the table; :func:`compare` puts several side by
    side.
    """

    name: str
    """The model's label in tables."""
    metrics: dict[str, float]
    """One flat dict: the metric keys (``rouge1``, ``bleu``, ``perplexity``, ...) and ``rows``."""
    predictions: tuple[str, ...] = ()
    """The generated answers, in data order (empty when only loss metrics were asked for)."""
    references: tuple[str, ...] = ()
    """The reference answers, in data order."""
    prompts: tuple[str, ...] = ()
    """The last user message of each row (for looking at predictions)."""

    def to_markdown(self, **options: Any) -> str:
        """The result as a Markdown table (see :func:`compare` for the options)."""
        return compare(self, **options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: name, metrics, and per-row prompt / prediction / reference."""
        rows = [
            {"prompt": p, "prediction": pr, "reference": r}
            for p, pr, r in zip(self.prompts, self.predictions, self.references, strict=False)
        ]
        return {"name": self.name, "metrics": dict(self.metrics), "rows": rows}

    def __str__(self) -> str:
        return self.to_markdown()


_PERCENT_KEYS = ("exact_match", "accuracy")


def _format(key: str, value: float, percent: bool) -> str:
    if key == "rows":
        return str(int(value))
    if percent and (key.startswith(_PERCENT_KEYS) or key.startswith("rouge")):
        return f"{100 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"


def compare(
    *results: EvalResult, metrics: Sequence[str] | Mapping[str, str] | None = None, percent: bool = True
) -> str:
    """A Markdown table with one row per result and one column per metric.

    Args:
        results: :class:`EvalResult` objects (e.g. before and after fine-tuning).
        metrics: the columns, in order (a dict maps each key to its column title); by default every key of the
            first result except ``rows``.
        percent: show 0-1 scores (exact match, accuracy, ROUGE) as percentages.
    """
    if not results:
        raise ConfigError("compare() needs at least one EvalResult.")
    if metrics is None:
        titles = {k: k for k in results[0].metrics if k != "rows"}
    elif isinstance(metrics, Mapping):
        titles = dict(metrics)
    else:
        titles = {k: k for k in metrics}
    keys = list(titles)
    header = ["model", *titles.values()]
    body = [
        [r.name, *(_format(k, r.metrics[k], percent) if k in r.metrics else "-" for k in keys)]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in body:
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- generation and loss, batched -----------------------------------------------------------------------


def generate_texts(
    model: Any,
    tokenizer: Any,
    template: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy responses to tokenized prompts, ``batch_size`` at a time (left-padded), cut at the template's
    end-of-turn exactly like :meth:`lorakit.InferenceModel.generate`. The model's train/eval mode is kept."""
    import torch

    from lorakit.generation import cut_at_stops, prompt_learning_generation
    from lorakit.inference import InferenceModel

    stops = template.stop_strings(tokenizer)
    eos_ids = InferenceModel(model, tokenizer, template)._stop_token_ids(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_ids,
        "pad_token_id": pad,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    multi = [s for s in stops if len(tokenizer.encode(s, add_special_tokens=False)) > 1]
    if multi:
        kwargs.update(stop_strings=multi, tokenizer=tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [list(ids) for ids in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            attention = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
            )
            with torch.inference_mode(), prompt_learning_generation(model):
                output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            for row in output[:, width:].tolist():
                ended = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
                texts.append(cut_at_stops(tokenizer.decode(row[:ended], skip_special_tokens=True), stops))
            del output, input_ids, attention
    finally:
        model.train(was_training)
    return texts


def mean_token_nll(
    model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_token_id: int
) -> tuple[float, int]:
    """Mean negative log-likelihood per trained token over ``(input_ids, labels)`` examples, and the token
    count. Two running sums: one batch of logits at a time."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([list(i) + [pad_token_id] * (width - len(i)) for i, _ in batch], device=device)
            labels = torch.tensor(
                [list(lb) + [IGNORE_INDEX] * (width - len(lb)) for _, lb in batch], device=device
            )
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            total += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((shifted != IGNORE_INDEX).sum())
            del logits
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("No reference tokens to score: every reference is empty after tokenization.")
    return total / count, count


# --- standalone evaluation ------------------------------------------------------------------------------


def _load_model(model: Any, template: Any) -> Any:
    from lorakit.inference import InferenceModel

    if isinstance(model, InferenceModel):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if path.is_dir():
            if (path / "lorakit_run.json").is_file() or (path / "adapter_config.json").is_file():
                return InferenceModel.load(path, template=template)
            if (path / "config.json").is_file():
                return InferenceModel.load(path, template=template)
        return InferenceModel.from_model(str(model), template=template if template is not None else "model")
    raise ConfigError(
        f"evaluate(model=...) takes a run directory, an InferenceModel or a model id/path; got "
        f"{type(model).__name__}."
    )


def _conversations(data: Any, limit: int | None) -> list[list[dict[str, Any]]]:
    """Rows of any data source as conversations that end with the reference reply."""
    from lorakit.data import detect_format, to_messages
    from lorakit.data.load import load_rows

    if isinstance(data, Path):
        data = str(data)
    if hasattr(data, "to_list") and not isinstance(data, (str, list)):
        data = data.to_list()
    rows, label = load_rows(data)
    if limit is not None:
        rows = rows[:limit]
    fmt = detect_format(list(rows[0]))
    conversations = []
    for index, row in enumerate(rows):
        messages = to_messages(row, fmt, row_index=index, source_name=label)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{label}, row {index}: no reference reply to compare with; the row must end with one."
            )
        conversations.append(messages)
    return conversations


def evaluate(
    model: Any,
    data: Any,
    metrics: Any = ("perplexity",),
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    limit: int | None = None,
    template: Any = None,
    max_length: int = 1024,
    name: str | None = None,
) -> EvalResult:
    """Evaluate a model on rows with reference replies and return a result table.

    Args:
        model: a lorakit run directory, a PEFT adapter directory, a saved model directory, an
            :class:`lorakit.InferenceModel`, or a base model id / alias (``"smollm2-135m"``).
        data: rows in any form ``with_dataset`` accepts (path, list of dicts, Dataset, DataFrame) whose last
            assistant reply is the reference.
        metrics: metric specs (see :mod:`lorakit.metrics`); ``perplexity`` is computed teacher-forced on the
            references, the others on greedy generations.
        max_new_tokens: longest generated answer.
        batch_size: rows generated / scored together (memory grows with this, not with the data).
        limit: evaluate the first N rows only.
        template: prompt template for a base model or to override a run's own (default: the run's, or the
            tokenizer's chat template for a base model).
        max_length: longest tokenized example for perplexity (longer ones lose the start of the prompt).
        name: the label in tables (default: the model's path or id).
    """
    from lorakit.config import _to_metric_specs
    from lorakit.data import encode, encode_prompt
    from lorakit.metrics import compute, get_metric

    specs = _to_metric_specs(metrics)
    if not specs:
        raise ConfigError("evaluate(metrics=...) needs at least one metric, e.g. ['exact_match'].")
    resolved = [get_metric(spec) for spec in specs]
    for label, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"evaluate({label}=...) must be a positive integer, got {value!r}.")
    label = name or (str(model) if isinstance(model, (str, Path)) else repr(model))
    conversations = _conversations(data, limit)
    loaded = _load_model(model, template)
    tokenizer, chosen = loaded.tokenizer, loaded.template
    references = [conversation[-1]["content"] for conversation in conversations]
    prompts = [conversation[-2]["content"] if len(conversation) > 1 else "" for conversation in conversations]
    results: dict[str, float] = {}
    predictions: list[str] = []
    loss = None
    if any(m.needs == "loss" for m in resolved):
        examples = []
        for conversation in conversations:
            encoded = encode(conversation, chosen, tokenizer, max_length=max_length)
            labels = [
                token if any(start <= i < end for start, end in encoded.spans[-1:]) else IGNORE_INDEX
                for i, token in enumerate(encoded.input_ids)
            ]
            examples.append((encoded.input_ids, labels))
        loss, _ = mean_token_nll(
            loaded.model, examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id
        )
        results["loss"] = loss
    if any(m.needs == "text" for m in resolved):
        prompt_ids = [encode_prompt(conversation[:-1], chosen, tokenizer) for conversation in conversations]
        predictions = generate_texts(
            loaded.model, tokenizer, chosen, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    results.update(compute(resolved, predictions=predictions or None, references=references, loss=loss))
    results["rows"] = float(len(conversations))
    return EvalResult(
        name=label,
        metrics=results,
        predictions=tuple(predictions),
        references=tuple(references),
        prompts=tuple(prompts),
    )


# --- during training ------------------------------------------------------------------------------------


def split_tokenized(row: Mapping[str, Any]) -> list[tuple[list[int], list[int]]]:
    """A tokenized dataset row as ``(input_ids, labels)`` examples (a packed row holds several)."""
    ids, labels = list(row["input_ids"]), list(row["labels"])
    lengths = row.get("seq_lengths")
    if not lengths:
        return [(ids, labels)]
    out, start = [], 0
    for length in lengths:
        out.append((ids[start : start + length], labels[start : start + length]))
        start += length
    return out


def prompt_and_reference(ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """The prompt (everything before the last trained span) and the reply tokens (that span), or None when
    the example has no untrained prefix (``train_on_inputs=True``, raw text)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if end == 0 or start == 0:
        return None
    return list(ids[:start]), list(ids[start:end])


@attrs.define
class GenerationSet:
    """A fixed subset of the validation split: prompt token ids and reference texts."""

    prompts: list[list[int]]
    references: list[str]

    @classmethod
    def from_dataset(cls, dataset: Any, *, n: int, tokenizer: Any, template: Any) -> GenerationSet:
        from lorakit.generation import cut_at_stops

        stops = template.stop_strings(tokenizer)
        prompts, references = [], []
        for row in dataset:
            for ids, labels in split_tokenized(row):
                split = prompt_and_reference(ids, labels)
                if split is None:
                    continue
                prompts.append(split[0])
                references.append(cut_at_stops(tokenizer.decode(split[1], skip_special_tokens=True), stops))
                if len(prompts) == n:
                    return cls(prompts, references)
        return cls(prompts, references)


class TrainingEvaluator:
    """Computes the ``eval_*`` numbers that the trainer's own evaluation loop does not: perplexity from the
    eval loss, and text metrics on greedy generations for a fixed validation subset."""

    def __init__(
        self, spec: Any, generation_set: GenerationSet | None, tokenizer: Any, template: Any
    ) -> None:
        from lorakit.metrics import get_metric

        self.spec = spec
        self.metrics = [get_metric(m) for m in spec.metrics]
        self.text_metrics = [m for m in self.metrics if m.needs == "text"]
        self.generation_set = generation_set
        self.tokenizer = tokenizer
        self.template = template
        self.last_predictions: list[str] = []

    def __call__(self, model: Any, eval_loss: float | None) -> dict[str, float]:
        from lorakit.metrics import compute, perplexity_from_loss

        out: dict[str, float] = {}
        if eval_loss is not None and any(m.needs == "loss" for m in self.metrics):
            out["eval_perplexity"] = perplexity_from_loss(eval_loss)
        if self.text_metrics and self.generation_set is not None and self.generation_set.prompts:
            predictions = generate_texts(
                model,
                self.tokenizer,
                self.template,
                self.generation_set.prompts,
                max_new_tokens=self.spec.max_new_tokens,
                batch_size=self.spec.batch_size,
            )
            self.last_predictions = predictions
            scores = compute(
                self.text_metrics, predictions=predictions, references=self.generation_set.references
            )
            out.update({f"eval_{key}": value for key, value in scores.items()})
        return out


def sample_prompts(spec: Any, val: Any, tokenizer: Any, template: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and display text of the fixed sample prompts (the spec's, or the first validation rows)."""
    from lorakit.inference import InferenceModel

    if spec.prompts:
        helper = InferenceModel(None, tokenizer, template)
        shown = [p if isinstance(p, str) else json.dumps(dict(p), ensure_ascii=False) for p in spec.prompts]
        return [helper.encode(p) for p in spec.prompts], shown
    if val is None:
        return [], []
    subset = GenerationSet.from_dataset(val, n=spec.n, tokenizer=tokenizer, template=template)
    return subset.prompts, [tokenizer.decode(ids, skip_special_tokens=True) for ids in subset.prompts]


def sample_callback(
    spec: Any, prompts: list[list[int]], shown: list[str], tokenizer: Any, template: Any, tracker: Any
) -> Any:
    """A TrainerCallback that generates for the fixed prompts and hands the rows to the tracker."""
    from transformers import TrainerCallback

    class GenerationSamples(TrainerCallback):
        """Generations for fixed prompts, logged at each evaluation (or every ``every`` steps) and at the end."""

        def __init__(self) -> None:
            self.logged_step = -1

        def _log(self, state: Any, model: Any) -> None:
            if not prompts or model is None or state.global_step == self.logged_step:
                return
            texts = generate_texts(
                model,
                tokenizer,
                template,
                prompts,
                max_new_tokens=spec.max_new_tokens,
                batch_size=len(prompts),
            )
            rows = [
                {"step": state.global_step, "prompt": p, "generation": t}
                for p, t in zip(shown, texts, strict=True)
            ]
            tracker.log_samples(state.global_step, rows)
            self.logged_step = state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if spec.every is not None and state.global_step % spec.every == 0:
                self._log(state, model)

        def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if spec.every is None:
                self._log(state, model)

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self._log(state, model)

    return GenerationSamples()

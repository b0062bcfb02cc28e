"""Verifying a merge: the merged model against adapter-on-base, on the same token sequences.

:func:`reference_outputs` runs the adapter model once (before the merge, so with ``inplace=True`` the
adapter model can be freed afterwards) and keeps its logits; :func:`compare` runs the merged model on the same
sequences and returns a :class:`MergeReport` with the largest logit difference and both perplexities. The
perplexities are ``exp`` of lorakit's one loss (:mod:`lorakit.metrics.loss`: mean negative log-likelihood over
the scored tokens).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.data import detect_format, encode, encode_prompt, to_messages
from lorakit.data.encode import IGNORE_INDEX
from lorakit.data.load import load_rows
from lorakit.errors import ConfigError, LorakitError
from lorakit.metrics import perplexity_from_loss
from lorakit.metrics.loss import token_nll
from lorakit.rundir import read_run

__all__ = [
    "DEFAULT_VERIFY_PROMPTS",
    "MergeReport",
    "compare",
    "logit_tolerance",
    "reference_outputs",
    "verification_sequences",
]

_LOGIT_TOLERANCE = {"float32": (1e-3, 1e-5), "float16": (2e-2, 8e-3), "bfloat16": (5e-2, 6.25e-2)}
"""(absolute, relative) tolerance of merged-vs-adapter logits per dtype of the merged weights. The relative
part is ~8 units in the last place (fp16: 2**-10 * 8, bf16: 2**-7 * 8): a merge re-rounds every weight once
and the rounding errors of a forward pass add up over the layers."""

DEFAULT_VERIFY_PROMPTS = (
    "Explain in one sentence what a language model does.",
    "List three colours.",
    "Write a short greeting for a customer.",
    "What is two plus two?",
)
"""Prompts used when neither ``verify_prompts`` nor the run's own training rows are available."""


@attrs.frozen
class MergeReport:
    """How the merged model compares with the adapter on its base, on the same token sequences."""

    max_logit_diff: float
    """Largest absolute difference of any logit at any position (0 for a perfect merge)."""
    perplexity_adapter: float
    """Perplexity of the adapter-on-base model on the scored tokens."""
    perplexity_merged: float
    """Perplexity of the merged model on the same tokens."""
    n_sequences: int
    """Sequences compared."""
    n_tokens: int
    """Tokens scored for perplexity."""
    reference: str
    """What the merged model was compared with, e.g. ``"adapter on the 4-bit base"``."""
    merged_dtype: str
    """dtype of the merged weights."""
    logit_tolerance: float = 0.0
    """The largest ``max_logit_diff`` a correct merge in ``merged_dtype`` shows (:func:`logit_tolerance`)."""

    @property
    def logits_match(self) -> bool:
        """``max_logit_diff`` within :attr:`logit_tolerance`: the merge folded the adapter in correctly."""
        return self.max_logit_diff <= self.logit_tolerance

    @property
    def perplexity_change(self) -> float:
        """Relative change, ``merged / adapter - 1`` (0.01 = 1% higher perplexity after merging)."""
        return self.perplexity_merged / self.perplexity_adapter - 1.0

    def summary(self) -> str:
        return (
            f"merge check on {self.n_sequences} sequences ({self.n_tokens} tokens) against the {self.reference}: "
            f"max |logit diff| {self.max_logit_diff:.3g}, perplexity {self.perplexity_adapter:.4f} -> "
            f"{self.perplexity_merged:.4f} ({100 * self.perplexity_change:+.3f}%), merged weights {self.merged_dtype}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "perplexity_change": self.perplexity_change}


def verification_sequences(
    tokenizer: Any, template: Any, prompts: Sequence[Any] | None, adapter_dir: Path | None, n: int = 4
) -> list[tuple[list[int], list[bool]]]:
    """Token sequences to compare on, and which positions are scored for perplexity.

    ``prompts`` may hold strings (the rendered prompt is scored) or data rows with a reply (the reply is
    scored, as in training). Without prompts, the first ``n`` rows of the run's training data are used if the
    run directory names a readable file, else :data:`DEFAULT_VERIFY_PROMPTS`.
    """
    if prompts is None:
        defaults: list[Any] = list(DEFAULT_VERIFY_PROMPTS)
        prompts = _run_rows(adapter_dir, n) or defaults
    if isinstance(prompts, (str, Mapping)) or not prompts:
        raise ConfigError(
            f"`verify_prompts` must be a non-empty list of prompt strings or data rows, got {prompts!r}."
        )
    sequences = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = encode_prompt([{"role": "user", "content": prompt}], template, tokenizer)
            sequences.append((ids, [i > 0 for i in range(len(ids))]))
        elif isinstance(prompt, Mapping):
            messages = to_messages(
                dict(prompt), detect_format(list(prompt)), row_index=index, source_name="verify_prompts"
            )
            row = encode(messages, template, tokenizer, max_length=1024)
            sequences.append((row.input_ids, [label != IGNORE_INDEX for label in row.labels]))
        else:
            raise ConfigError(f"verify_prompts[{index}] must be a string or a row dict, got {prompt!r}.")
    return sequences


def _run_rows(adapter_dir: Path | None, n: int) -> list[dict[str, Any]]:
    """The first ``n`` training rows of a run, when its config names a readable data file.

    A run file or data file that cannot be read warns and gives no rows (the check then uses generic
    prompts): the check never blocks a merge.
    """
    if adapter_dir is None:
        return []
    source = None
    try:
        run = read_run(adapter_dir)
        source = run and (run["pipeline"].get("data") or {}).get("source")
        if not isinstance(source, str) or not Path(source).expanduser().is_file():
            return []
        rows, _ = load_rows(source)
    except (LorakitError, OSError) as error:
        warnings.warn(
            f"merge(verify=True): cannot read the run's training rows ({source or adapter_dir}): {error}. "
            "The check uses generic prompts; pass verify_prompts=[...] to choose them.",
            stacklevel=5,  # the caller of InferenceModel.merge
        )
        return []
    return rows[:n]


def _forward(model: Any, ids: list[int]) -> Any:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def _nll(logits: Any, ids: list[int], scored: list[bool]) -> tuple[float, int]:
    """:func:`lorakit.metrics.loss.token_nll` of one sequence whose ``scored`` positions are the labels."""
    import torch

    labels = torch.tensor([t if s else IGNORE_INDEX for t, s in zip(ids, scored, strict=True)])
    return token_nll(logits, labels)


def logit_tolerance(dtype: str, scale: float) -> float:
    """The merged-vs-adapter logit difference a correct merge stays within, for merged weights in ``dtype``
    (``"float32"``, ``"bfloat16"``, ``"float16"``) and logits of magnitude up to ``scale``: 1e-3 + 1e-5 * scale
    in fp32, 0.02 + 0.008 * scale in fp16, 0.05 + 0.0625 * scale in bf16.

    Example:
        >>> logit_tolerance("float32", 10.0)
        0.0011
    """
    absolute, relative = _LOGIT_TOLERANCE.get(dtype.replace("torch.", ""), _LOGIT_TOLERANCE["bfloat16"])
    return round(absolute + relative * scale, 12)


def reference_outputs(model: Any, sequences: list[tuple[list[int], list[bool]]]) -> list[Any]:
    """Logits of the adapter model on each sequence (kept on the CPU in fp32)."""
    return [_forward(model, ids) for ids, _ in sequences]


def compare(
    merged: Any,
    sequences: list[tuple[list[int], list[bool]]],
    reference: list[Any],
    *,
    reference_name: str,
    tolerance: float = 0.01,
) -> MergeReport:
    """Run the merged model on ``sequences`` and compare with the reference logits.

    Warns when the perplexity changed by more than ``tolerance`` (relative): the merge lost quality.
    """
    max_diff = 0.0
    nll_ref = nll_merged = 0.0
    count = 0
    for (ids, scored), ref_logits in zip(sequences, reference, strict=True):
        logits = _forward(merged, ids)
        max_diff = max(max_diff, float((logits - ref_logits).abs().max()))
        a, n = _nll(ref_logits, ids, scored)
        b, _ = _nll(logits, ids, scored)
        nll_ref, nll_merged, count = nll_ref + a, nll_merged + b, count + n
    count = max(count, 1)
    merged_dtype = str(next(merged.parameters()).dtype).replace("torch.", "")
    scale = max((float(ref.abs().max()) for ref in reference), default=0.0)
    report = MergeReport(
        max_logit_diff=max_diff,
        perplexity_adapter=perplexity_from_loss(nll_ref / count),
        perplexity_merged=perplexity_from_loss(nll_merged / count),
        n_sequences=len(sequences),
        n_tokens=count,
        reference=reference_name,
        merged_dtype=merged_dtype,
        logit_tolerance=logit_tolerance(merged_dtype, scale),
    )
    if abs(report.perplexity_change) > tolerance:
        warnings.warn(
            f"The merged model's perplexity differs by {100 * report.perplexity_change:+.2f}% from the adapter on "
            f"its base (more than tolerance={tolerance}): {report.summary()}. For a QLoRA run some difference "
            "is expected (the merge uses the un-quantized base); otherwise serve the adapter unmerged.",
            stacklevel=3,
        )
    return report

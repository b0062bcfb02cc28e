"""Hugging Face model cards: ``README.md`` with YAML front matter in every adapter and merged directory.

``train()`` writes one into the run directory (replacing PEFT's empty template), ``InferenceModel.save`` into a
merged model directory; ``InferenceModel.push_to_hub`` uploads it with the weights, so the Hub shows a real
card. The front matter holds ``base_model``, ``library_name`` (``peft`` for an adapter, ``transformers`` for
a merged model), ``tags``, ``datasets`` (a Hub dataset id when the data came from the Hub), ``metrics`` and a
``lorakit`` section (the template, the method, the dataset fingerprint — a SHA-256 of the training data copy —
and the metric values); the body shows the prompt format and how to load the model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import MissingDependencyError
from lorakit.rundir import (
    CHECKPOINTS_DIR,
    METRICS_LOG,
    MODEL_CARD_FILE,
    SAMPLES_LOG,
    SOURCE_COPY,
    STAGING_DIR,
    TENSORBOARD_DIR,
    RunDir,
    write_text_atomic,
)

__all__ = ["model_card", "push_folder", "write_model_card", "write_run_card"]

_EXAMPLE = [{"role": "user", "content": "What is the capital of France?"}]


def _fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _hub_dataset(source: Any) -> str | None:
    """The source when it names a Hub dataset (``owner/name``, not a local path or data file)."""
    if not isinstance(source, str) or not re.fullmatch(r"[\w-]+/[\w.-]+", source) or Path(source).exists():
        return None
    return None if Path(source).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt") else source


def _prompt_example(template: Any, tokenizer: Any) -> str | None:
    if template is None or tokenizer is None:
        return None
    pieces = template.render(_EXAMPLE, tokenizer=tokenizer, add_generation_prompt=True)
    return "".join(text for text, _ in pieces)


def _usage(adapter: bool, base_model: str | None) -> str:
    if adapter:
        return (
            "```python\nimport lorakit as lk\n\n"
            'model = lk.InferenceModel.load("<this repo or directory>")  # the base, the adapter and the template\n'
            'print(model.chat([{"role": "user", "content": "Hi"}]))\n```\n\n'
            "Plain PEFT (render prompts in the format above yourself):\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("<this repo or directory>")\n```\n'
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or directory>")\n'
        'model = AutoModelForCausalLM.from_pretrained("<this repo or directory>")\n'
        'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, '
        'return_tensors="pt")\n```\n\n'
        "The tokenizer's chat template is the training template, and `generation_config.json` stops at its end of "
        'turn. Or `lk.InferenceModel.load("<this repo or directory>")`.\n'
    )


def model_card(
    *,
    base_model: str | None,
    template: Any,
    adapter: bool,
    tokenizer: Any = None,
    record: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset_fingerprint: str | None = None,
) -> str:
    """The text of a model card (front matter and body); see the module docstring for its fields."""
    pipeline = (record or {}).get("pipeline") or {}
    method = (pipeline.get("method") or {}).get("name")
    numbers = {k: round(float(v), 6) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    source = (pipeline.get("data") or {}).get("source")
    front: dict[str, Any] = {"base_model": base_model} if base_model else {}
    front["library_name"] = "peft" if adapter else "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["lorakit", *([method] if method else []), "adapter" if adapter else "merged"]
    if _hub_dataset(source):
        front["datasets"] = [source]
    if numbers:
        front["metrics"] = sorted(numbers)
    front["lorakit"] = {
        "template": getattr(template, "name", None),
        "method": method,
        "dataset_fingerprint": dataset_fingerprint,
        "metrics": numbers,
    }
    title = "LoRA adapter" if adapter else "Merged model"
    lines = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n", f"# {title} trained with lorakit\n"]
    if base_model:
        lines.append(f"Base model: `{base_model}`" + (f", method: `{method}`." if method else "."))
    if numbers:
        lines += ["\n## Metrics\n", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:g} |" for name, value in sorted(numbers.items())]
    example = _prompt_example(template, tokenizer)
    lines.append(
        f"\n## Prompt format\n\nTemplate `{getattr(template, 'name', template)}`; a user turn renders as:\n"
    )
    if example is not None:
        lines.append(f"```text\n{example}\n```")
    lines += ["\n## How to load\n", _usage(adapter, base_model)]
    return "\n".join(lines)


def write_model_card(directory: str | Path, **fields: Any) -> Path:
    """Write :func:`model_card` (``fields`` are its arguments) as ``README.md`` in ``directory``."""
    path = Path(directory) / MODEL_CARD_FILE
    write_text_atomic(path, model_card(**fields))
    return path


def write_run_card(run_dir: str | Path, template: Any, tokenizer: Any = None) -> Path:
    """The card of a finished run directory: its record, metrics and data copy (``train()`` calls this)."""
    rundir = RunDir(Path(run_dir))
    record = rundir.read_run() or {}
    model = (record.get("pipeline") or {}).get("model") or {}
    return write_model_card(
        run_dir,
        base_model=model.get("name_or_path"),
        template=template,
        adapter=rundir.is_adapter(),
        tokenizer=tokenizer,
        record=record,
        metrics=rundir.read_metrics(),
        dataset_fingerprint=_fingerprint(rundir.source_copy),
    )


# --- publishing ------------------------------------------------------------------------------------------

_NEVER_UPLOADED = (
    f"{CHECKPOINTS_DIR}/*",
    f"{Path(SOURCE_COPY).parent}/*",  # the copy of the training data stays private
    f"{TENSORBOARD_DIR}/*",
    f"{STAGING_DIR}/*",
    METRICS_LOG,
    SAMPLES_LOG,
)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload with lorakit",
) -> str:
    """Create ``repo_id`` (private by default; kept if it exists) and upload ``folder`` as one commit; the
    commit URL. Checkpoints, the training data copy, TensorBoard files and the metric / sample logs of a
    run directory are never uploaded. ``endpoint`` (default: ``$HF_ENDPOINT``, else huggingface.co) and
    ``token`` (default: the logged-in one) go to ``huggingface_hub.HfApi``."""
    try:
        from huggingface_hub import HfApi
    except ImportError as error:
        raise MissingDependencyError(
            "push_to_hub needs huggingface_hub: pip install huggingface_hub"
        ) from error
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=list(_NEVER_UPLOADED),
        repo_type="model",
    )
    return str(getattr(commit, "commit_url", commit))

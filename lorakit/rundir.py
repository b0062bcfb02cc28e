"""The run directory: the one module that knows its layout, its file names and how each file is written.

Everything a run produced sits in one directory, readable without lorakit where possible::

    <run>/adapter_config.json          PEFT adapter (peft.PeftModel.from_pretrained(base, <run>) loads it)
    <run>/adapter_model.safetensors
    <run>/config.json, model*.safetensors   instead of the adapter: the whole model of a full fine-tuning
    <run>/tokenizer.json, tokenizer_config.json, ...   the tokenizer used in training (pad token included)
    <run>/lorakit_run.json             pipeline config, resolved base path, template, precision, data report,
                                       versions
    <run>/lorakit_provenance.json      base model id, resolved path and config fingerprint (see below)
    <run>/metrics.json                 final metrics (train / eval loss, eval perplexity, runtime, ...)
    <run>/metrics.jsonl                every logged step, one JSON object per line
    <run>/samples.jsonl                generation samples (log_samples()), one JSON object per line
    <run>/report.md                    the end-of-run report: settings, final numbers, evaluations, samples
    <run>/curves.png                   loss and metric curves (needs matplotlib)
    <run>/data/source.jsonl            in-memory training rows (only when the source was not a file)
    <run>/tensorboard/                 TensorBoard events (track("tensorboard"))
    <run>/wandb/                       W&B run files (track("wandb"); offline without an API key)
    <run>/quickstart.json              the quickstart's before / after table (lorakit quickstart only)
    <run>/checkpoints/checkpoint-<step>/   adapter, optimizer, scheduler, RNG states, trainer_state.json,
                                       lorakit_method_state.safetensors (the method's own state; optional),
                                       lorakit_resume.json (config + data fingerprint, early-stopping state;
                                       written last)
    <run>/checkpoints/.partial/        a checkpoint being written; renamed into place when complete

An exported merged model (``InferenceModel.save(path)``) is a plain transformers directory plus
``lorakit_template.json``, the prompt template it was trained with.

Provenance: the fingerprint in ``lorakit_provenance.json`` is a SHA-256 of the base model's ``config.json``
with the keys that do not change the weights' meaning removed (dtype, transformers version, paths, cache /
quantization settings), so a local copy of the same checkpoint matches and another architecture or size does
not. Loading the adapter onto a base with another fingerprint raises :class:`~lorakit.errors.ConfigError`
unless ``allow_base_mismatch=True``.

Example:
    >>> run = RunDir("runs/demo")
    >>> run.metrics_log.name
    'metrics.jsonl'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError
from lorakit.models import load_model_config

__all__ = [
    "PICKLED_WEIGHTS",
    "check_safe_weights",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "CURVES_FILE",
    "METRICS_FILE",
    "METHOD_STATE_FILE",
    "METRICS_LOG",
    "MODEL_CONFIG",
    "PROVENANCE_FILE",
    "QUICKSTART_FILE",
    "REPORT_FILE",
    "RESUME_FILE",
    "RUN_FILE",
    "RUN_OUTPUTS",
    "SAMPLES_LOG",
    "SOURCE_COPY",
    "STAGING_DIR",
    "STATE_FILE",
    "TEMPLATE_FILE",
    "TENSORBOARD_DIR",
    "TOKENIZER_CONFIG",
    "RunDir",
    "append_jsonl",
    "atomic_target",
    "base_fingerprint",
    "check_base",
    "check_output_dir",
    "checkpoint_name",
    "checkpoint_step",
    "clean_staging",
    "config_fingerprint",
    "find_resume_checkpoint",
    "list_checkpoints",
    "publish_checkpoint",
    "read_json",
    "read_log",
    "read_provenance",
    "read_run",
    "truncate_log",
    "write_json_atomic",
    "write_provenance",
    "write_text_atomic",
]

# --- every name, once ---------------------------------------------------------------------------------------

RUN_FILE = "lorakit_run.json"
PROVENANCE_FILE = "lorakit_provenance.json"
TEMPLATE_FILE = "lorakit_template.json"
METRICS_FILE = "metrics.json"
METRICS_LOG = "metrics.jsonl"
SAMPLES_LOG = "samples.jsonl"
REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
QUICKSTART_FILE = "quickstart.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
"""A transformers model directory's config (a full fine-tuning run, a merged export, a base model)."""
TOKENIZER_CONFIG = "tokenizer_config.json"
SOURCE_COPY = "data/source.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".partial"
CHECKPOINT_PREFIX = "checkpoint-"
RESUME_FILE = "lorakit_resume.json"
STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "lorakit_method_state.safetensors"
"""A checkpoint's method resume state (a method's ``resume_state`` hook; optional)."""

RUN_OUTPUTS = (SAMPLES_LOG, REPORT_FILE, CURVES_FILE)
"""Files a run writes besides the adapter and metrics; a fresh run removes stale ones."""
_FRESH_RUN_STALE = (METRICS_LOG, METRICS_FILE, RUN_FILE, *RUN_OUTPUTS)
_RESUME_STALE = (METRICS_FILE, REPORT_FILE, CURVES_FILE)
_RESUME_LOGS = (METRICS_LOG, SAMPLES_LOG)

# --- atomic writes and JSON ---------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix) to write to; renamed onto ``path`` when the block ends
    without error, removed otherwise. Readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text aside and rename it into place."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON aside and rename it into place, so readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file of a run directory, or None when it does not exist.

    Raises:
        ConfigError: the file is not valid JSON (the run directory is damaged).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); the run directory is damaged.") from error


# --- JSONL logs (metrics.jsonl, samples.jsonl) ----------------------------------------------------------


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON object per row to a log."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a JSONL log; a line torn by a crash is skipped, a missing file has none."""
    entries = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log up to ``step`` (a torn line is dropped): a resumed run logs the later
    steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(entry.get("step", 0)) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


# --- output directory checks ----------------------------------------------------------------------------


def check_output_dir(path: Path, *, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train({str(path)!r}): a file is in the way; pass a directory path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"train({str(path)!r}): the directory is not empty. Pick a new directory, or pass overwrite=True "
            "to replace the run in it."
        )


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``lorakit_run.json`` of a run directory, or None for a plain PEFT adapter directory.

    Raises:
        ConfigError: ``run_dir`` is not a directory, holds neither file, or its run file is not valid JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is not a directory; pass a lorakit run directory or a PEFT adapter directory."
        )
    path = run_dir / RUN_FILE
    if not path.is_file():
        if not (run_dir / ADAPTER_CONFIG).is_file():
            raise ConfigError(
                f"{run_dir} holds neither {RUN_FILE} (a lorakit run) nor {ADAPTER_CONFIG} (a PEFT adapter)."
            )
        return None
    return read_json(path)


# --- provenance -----------------------------------------------------------------------------------------

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
    path = Path(base_path) / MODEL_CONFIG
    if path.is_file():
        return config_fingerprint(json.loads(path.read_text()))
    return config_fingerprint(load_model_config(spec))


def write_provenance(
    output_dir: Path, spec: Any, base_path: str, *, parent: str | None = None
) -> dict[str, Any]:
    """Record the base model id, its resolved path and its config fingerprint in the run directory, and the
    run it started from (``Pipeline.from_run``), if any."""
    record = {
        "base_model": spec.name_or_path,
        "base_model_path": base_path,
        "revision": spec.revision,
        "config_fingerprint": base_fingerprint(base_path, spec),
    }
    if parent is not None:
        record["parent_run"] = parent
    write_json_atomic(Path(output_dir) / PROVENANCE_FILE, record)
    return record


def read_provenance(adapter_dir: Path) -> dict[str, Any] | None:
    """The provenance record of an adapter directory, or None (adapters trained elsewhere have none)."""
    return read_json(Path(adapter_dir) / PROVENANCE_FILE)


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


# --- checkpoints ----------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``."""
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``checkpoint-<step>`` directory (its path or name), -1 when the name carries none."""
    try:
        return int(Path(path).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with ``trainer_state.json``) in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and checkpoint_step(p) >= 0 and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(output_dir: Path, resume: bool | str | Path) -> Path:
    """The checkpoint to resume from: the latest in ``output_dir`` (``resume=True``) or the given one (a
    checkpoint, a run directory or a checkpoints directory)."""
    if resume is True:
        where = output_dir / CHECKPOINTS_DIR
    else:
        where = Path(str(resume)).expanduser()
        if (where / STATE_FILE).is_file():
            return where
        if (where / CHECKPOINTS_DIR).is_dir():
            where = where / CHECKPOINTS_DIR
        elif not where.is_dir():
            raise ConfigError(
                f"train(resume={str(resume)!r}): no such directory. Pass a checkpoint directory "
                f"(…/{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}<step>), a run directory, or resume=True."
            )
    found = list_checkpoints(where)
    if not found:
        raise ConfigError(
            f"train(resume=...): no complete checkpoint in {where}. Checkpoints are written by "
            ".with_checkpoints(every=N) (or with_training(save_steps=N)); start a new run without resume."
        )
    return found[-1]


def publish_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """Rename the complete ``.partial/checkpoint-<step>`` into place (replacing an older copy of that step)
    and remove ``.partial/`` when it is empty; returns the checkpoint's final path."""
    staging = checkpoints_dir / STAGING_DIR
    name = checkpoint_name(step)
    staged, final = staging / name, checkpoints_dir / name
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = staging / f"{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty
    return final


def clean_staging(checkpoints_dir: Path) -> None:
    """Remove what a crash left half-written."""
    staging = checkpoints_dir / STAGING_DIR
    if staging.exists():
        warnings.warn(f"Removing the incomplete checkpoint left by a crash: {staging}", stacklevel=2)
        shutil.rmtree(staging, ignore_errors=True)


# --- the run directory ----------------------------------------------------------------------------------


@attrs.frozen
class RunDir:
    """A run directory: a path per file, and the operations that read and write them."""

    path: Path = attrs.field(converter=lambda value: Path(value).expanduser())
    """The directory (it need not exist yet)."""

    # files and directories
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def provenance_file(self) -> Path:
        return self.path / PROVENANCE_FILE

    @property
    def template_file(self) -> Path:
        return self.path / TEMPLATE_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG

    @property
    def samples_log(self) -> Path:
        return self.path / SAMPLES_LOG

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def quickstart_file(self) -> Path:
        return self.path / QUICKSTART_FILE

    @property
    def adapter_config(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def adapter_weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def model_config(self) -> Path:
        return self.path / MODEL_CONFIG

    @property
    def tokenizer_config(self) -> Path:
        return self.path / TOKENIZER_CONFIG

    @property
    def source_copy(self) -> Path:
        return self.path / SOURCE_COPY

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def staging_dir(self) -> Path:
        return self.checkpoints_dir / STAGING_DIR

    # what the directory holds
    def is_run(self) -> bool:
        """Holds a lorakit run file."""
        return self.run_file.is_file()

    def is_adapter(self) -> bool:
        """Holds a PEFT adapter."""
        return self.adapter_config.is_file()

    def is_full_model(self) -> bool:
        """Holds a whole transformers model and no adapter (a full fine-tuning run or a merged export)."""
        return self.model_config.is_file() and not self.is_adapter()

    # the run record, metrics, template, provenance
    def write_run(self, record: Mapping[str, Any]) -> None:
        write_json_atomic(self.run_file, dict(record))

    def read_run(self) -> dict[str, Any] | None:
        """See :func:`read_run`."""
        return read_run(self.path)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        write_json_atomic(self.metrics_file, dict(metrics))

    def read_metrics(self) -> dict[str, Any]:
        """The final metrics, or ``{}`` before the run finished."""
        return read_json(self.metrics_file) or {}

    def write_template(self, template: Any) -> None:
        """Store a prompt template (an object with ``to_dict()`` or its dict) as ``lorakit_template.json``."""
        write_json_atomic(
            self.template_file, template.to_dict() if hasattr(template, "to_dict") else template
        )

    def read_template(self) -> dict[str, Any] | None:
        """The stored template's dict (``lorakit.templates.template_from_dict`` rebuilds it), or None."""
        return read_json(self.template_file)

    def write_provenance(self, spec: Any, base_path: str, *, parent: str | None = None) -> dict[str, Any]:
        return write_provenance(self.path, spec, base_path, parent=parent)

    def read_provenance(self) -> dict[str, Any] | None:
        return read_provenance(self.path)

    # logs
    def log_metrics(self, step: int, logs: Mapping[str, Any]) -> None:
        """Append one logged step to ``metrics.jsonl``."""
        append_jsonl(self.metrics_log, [{"step": step, **logs}])

    def read_metrics_log(self) -> list[dict[str, Any]]:
        return read_log(self.metrics_log)

    def log_samples(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append generation samples to ``samples.jsonl``."""
        append_jsonl(self.samples_log, rows)

    def read_samples(self) -> list[dict[str, Any]]:
        return read_log(self.samples_log)

    def truncate_logs(self, step: int) -> None:
        """Keep the lines of ``metrics.jsonl`` and ``samples.jsonl`` up to ``step``."""
        for name in _RESUME_LOGS:
            truncate_log(self.path / name, step)

    # the training rows
    def source_for_config(self, source: Any) -> str:
        """A path that reloads the training rows: the file itself (a Hub id stays an id), or a copy of
        in-memory rows (a list of dicts or a ``datasets.Dataset``) in ``data/source.jsonl``."""
        if isinstance(source, str):
            path = Path(source).expanduser()
            return str(path.resolve()) if path.exists() else source
        rows = source if isinstance(source, list) else source.to_list()
        write_text_atomic(
            self.source_copy, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        )
        return str(self.source_copy)

    # checkpoints
    def checkpoint(self, step: int) -> Path:
        """``checkpoints/checkpoint-<step>`` (it need not exist)."""
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.checkpoints_dir)

    # starting a run
    def check(self, *, overwrite: bool) -> None:
        """See :func:`check_output_dir`."""
        check_output_dir(self.path, overwrite=overwrite)

    def clear_for_fresh_run(self) -> None:
        """Remove a previous run's logs, record, report and checkpoints (``overwrite=True``); a fresh run must
        not append to its logs, rotate or resume its checkpoints."""
        for name in _FRESH_RUN_STALE:
            (self.path / name).unlink(missing_ok=True)
        if self.checkpoints_dir.is_dir():
            shutil.rmtree(self.checkpoints_dir)

    def prepare_resume(self, checkpoint: Path) -> None:
        """Before resuming from ``checkpoint``: drop what a crash left half-written, log lines past the
        checkpoint's step, and the final outputs the resumed run writes again."""
        clean_staging(checkpoint.parent)
        self.truncate_logs(checkpoint_step(checkpoint))
        for name in _RESUME_STALE:
            (self.path / name).unlink(missing_ok=True)


PICKLED_WEIGHTS = {
    "adapter_model.bin": "adapter_model.safetensors",
    "pytorch_model.bin": "model.safetensors",
    "pytorch_model.bin.index.json": "model.safetensors.index.json",
}
"""Pickled weight files PEFT / transformers would fall back to, and the safetensors file they would prefer.
(The libraries' own names: ``peft.utils.WEIGHTS_NAME``, ``transformers.utils.WEIGHTS_NAME`` /
``WEIGHTS_INDEX_NAME``: lorakit never writes them, but a directory someone else made may hold them.)"""


def check_safe_weights(run_dir: RunDir, *, allow_pickle: bool) -> None:
    """Refuse a directory whose weights exist only as pickle, which unpickling could run code from."""
    if allow_pickle or not run_dir.path.is_dir():
        return
    for pickled, safe in PICKLED_WEIGHTS.items():
        if (run_dir.path / pickled).is_file() and not (run_dir.path / safe).is_file():
            raise ConfigError(
                f"{run_dir.path / pickled} holds the weights as a pickle and there is no {safe}: loading it "
                "could run code stored in the file. Re-save the weights as safetensors (save_pretrained() "
                "writes them), or pass allow_pickle=True if you trust the directory (CLI: --allow-pickle)."
            )

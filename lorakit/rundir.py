"""The run directory: the one module that knows its layout, its file names and how each file is written.

Everything a run produced sits in one directory, readable without lorakit where possible::

    <run>/adapter_config.json          PEFT adapter (peft.PeftModel.from_pretrained(base, <run>) loads it)
    <run>/adapter_model.safetensors
    <run>/config.json, model*.safetensors   instead of the adapter: the whole model of a full fine-tuning
    <run>/tokenizer.json, tokenizer_config.json, ...   the tokenizer used in training (pad token included)
    <run>/lorakit_run.json             pipeline config, resolved base path, template, precision, data report,
                                       versions, SHA-256 of the weight files (checked when the run loads)
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
                                       lorakit_resume.json (config + data fingerprint, early-stopping state),
                                       lorakit_manifest.json (size and SHA-256 of every file; written last,
                                       after every file is flushed: the seal)
    <run>/checkpoints/.partial/        a checkpoint being written; renamed into place when sealed
    <run>/lorakit.lock                 the lock of the process training into the directory (lorakit.runlock)
    <run>/.lorakit-replaced/           overwrite=True: the previous run, moved aside until the new one saved

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
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError, CorruptArtifactError, StorageError
from lorakit.models import load_model_config

__all__ = [
    "PICKLED_WEIGHTS",
    "check_safe_weights",
    "ADAPTER_CONFIG",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "OPTIMIZER_FILE",
    "REPLACED_DIR",
    "RNG_PREFIX",
    "SCHEDULER_FILE",
    "TOKENIZER_FILES",
    "WANDB_DIR",
    "check_artifacts",
    "check_checkpoint",
    "check_free_space",
    "check_safetensors",
    "check_writable",
    "checksums",
    "seal_checkpoint",
    "sha256_file",
    "storage_guard",
    "ADAPTER_WEIGHTS",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "CURVES_FILE",
    "MODEL_CARD_FILE",
    "METRICS_FILE",
    "METHOD_STATE_FILE",
    "METRICS_LOG",
    "MODEL_CONFIG",
    "PROVENANCE_FILE",
    "QUICKSTART_FILE",
    "REPORT_FILE",
    "REPORT_HTML",
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
REPORT_HTML = "report.html"
CURVES_FILE = "curves.png"
MODEL_CARD_FILE = "README.md"
"""The Hugging Face model card of an adapter or merged directory (:mod:`lorakit.modelcard`)."""
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
MANIFEST_FILE = "lorakit_manifest.json"
"""A checkpoint's size and SHA-256 of every other file; written (fsynced) after them all: the seal."""
OPTIMIZER_FILE = "optimizer.pt"
"""transformers' ``OPTIMIZER_NAME`` (FSDP / DeepSpeed write a directory starting with ``optimizer`` /
``global_step`` instead)."""
SCHEDULER_FILE = "scheduler.pt"
"""transformers' ``SCHEDULER_NAME``."""
RNG_PREFIX = "rng_state"
"""transformers' RNG files: ``rng_state.pth``, or ``rng_state_<rank>.pth`` per process."""
LOCK_FILE = "lorakit.lock"
"""The advisory lock of the process training into the directory (pid, host, since); see lorakit.runlock."""
REPLACED_DIR = ".lorakit-replaced"
"""``overwrite=True``: the previous run's outputs, moved aside when the new run starts, removed when it ends."""
WANDB_DIR = "wandb"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
"""A tokenizer directory holds at least one of these beside ``tokenizer_config.json``."""

RUN_OUTPUTS = (SAMPLES_LOG, REPORT_FILE, REPORT_HTML, CURVES_FILE)
"""Files a run writes besides the adapter and metrics; a fresh run removes stale ones."""
_FRESH_RUN_STALE = (METRICS_LOG, METRICS_FILE, RUN_FILE, *RUN_OUTPUTS)
_RESUME_STALE = (METRICS_FILE, REPORT_FILE, REPORT_HTML, CURVES_FILE)
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
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
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
    record = read_json(path)
    if not isinstance(record, dict):
        raise CorruptArtifactError(
            f"{path} holds a JSON {type(record).__name__}, not a run record (an object): the run directory is "
            "damaged. Copy it again from where it was made, or train again."
        )
    return record


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


# --- integrity: file checks, checksums, the seal of a checkpoint ----------------------------------------------

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_safetensors(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (empty, cut short, header not JSON), or None. Reads the
    header only: the 8-byte header length, the JSON header, and that the tensors' byte ranges end exactly at
    the end of the file."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {'empty' if size == 0 else f'{size} bytes'}: no safetensors header"
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return f"{path.name} is cut short: its header says {length} header bytes, the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path.name}: the safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return f"{path.name}: the safetensors header is not a JSON object"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        return f"{path.name} is cut short: {size} bytes, its header describes {expected}"
    if expected < size:
        return f"{path.name} is {size} bytes, its header describes {expected}: extra bytes after the tensors"
    return None


def _check_file(path: Path) -> str | None:
    """A structural check of one file by its kind (safetensors header, torch zip archive, JSON), or None."""
    name = path.name
    if name.endswith(".safetensors"):
        return check_safetensors(path)
    if name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):
        return f"{name} is not a complete torch archive ({path.stat().st_size} bytes): cut short or damaged"
    if name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return f"{name} is not valid JSON ({error})"
    return None


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of the weight files (``*.safetensors``) of a run or model directory, by file name; recorded
    in the run record at save time and checked when the run loads."""
    return {path.name: sha256_file(path) for path in _weight_files(Path(directory))}


def check_artifacts(run_dir: RunDir, run: Mapping[str, Any] | None) -> None:
    """Check the files a load reads, before any of them is handed to PEFT / transformers: the run record's
    fields, the adapter / model weights (present, whole, matching the checksums recorded at save time) and
    the tokenizer files.

    Raises:
        CorruptArtifactError: naming every damaged file and what to do.
    """
    path, problems = run_dir.path, []
    if run is not None:
        problems.extend(_record_problems(run))
    if run is not None and not run_dir.is_adapter() and not run_dir.model_config.is_file():
        problems.append(f"neither the adapter ({ADAPTER_CONFIG}) nor a model ({MODEL_CONFIG}) is there")
    if run_dir.is_adapter() and not run_dir.adapter_weights.is_file():
        if not any((path / name).is_file() for name in PICKLED_WEIGHTS):
            problems.append(
                f"{ADAPTER_WEIGHTS} is missing beside {ADAPTER_CONFIG} (a copy that did not finish, or a run "
                "that stopped before its final save)"
            )
    for weights in _weight_files(path):
        problem = check_safetensors(weights)
        if problem is not None:
            problems.append(problem)
    problems.extend(_tokenizer_problems(path))
    recorded = (run or {}).get("checksums") or {}
    for name, digest in recorded.items() if isinstance(recorded, dict) else ():
        file = path / name
        if file.is_file() and not any(p.startswith(name) for p in problems) and sha256_file(file) != digest:
            problems.append(
                f"{name} does not match the SHA-256 recorded in {RUN_FILE} when the run saved it (the file "
                "changed or was damaged since)"
            )
    if problems:
        raise CorruptArtifactError(
            f"{path} cannot be loaded:\n  - "
            + "\n  - ".join(problems)
            + "\nCopy the run directory again from where it was made, load one of its checkpoints "
            f"({CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}<step>), or train again."
        )


def _record_problems(run: Mapping[str, Any]) -> list[str]:
    pipeline = run.get("pipeline")
    problems = []
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("model"), dict):
        problems.append(f"{RUN_FILE} has no 'pipeline.model' section (the base model it was trained on)")
    if not isinstance(run.get("template"), (dict, str)):
        problems.append(f"{RUN_FILE} has no 'template' (the prompt template it was trained with)")
    return problems


def _tokenizer_problems(path: Path) -> list[str]:
    config = path / TOKENIZER_CONFIG
    if not config.is_file():
        return []
    problems = [p for p in (_check_file(config),) if p is not None]
    present = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        problems.append(
            f"{TOKENIZER_CONFIG} is there but none of the tokenizer's files ({', '.join(TOKENIZER_FILES)})"
        )
    problems.extend(p for p in map(_check_file, present) if p is not None)
    return problems


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_checkpoint(staged: Path) -> None:
    """Seal a checkpoint written aside: flush every file to disk, then write the manifest (size and SHA-256
    of each) and flush it and the directory. A checkpoint is complete when it is sealed and its files match
    the manifest (:func:`check_checkpoint`); only then is it published."""
    files: dict[str, list[Any]] = {}
    for file in sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        _fsync(file)
        files[file.relative_to(staged).as_posix()] = [file.stat().st_size, sha256_file(file)]
    manifest = staged / MANIFEST_FILE
    write_json_atomic(manifest, {"files": files})
    _fsync(manifest)
    _fsync(staged)


def _required_problems(checkpoint: Path) -> list[str]:
    names = [p.name for p in checkpoint.iterdir()]
    wanted = {
        STATE_FILE: STATE_FILE in names,
        RESUME_FILE: RESUME_FILE in names,
        "the optimizer state (optimizer.pt)": any(n.startswith(("optimizer", "global_step")) for n in names),
        "the scheduler state (scheduler.pt)": SCHEDULER_FILE in names,
        "the RNG state (rng_state*.pth)": any(n.startswith(RNG_PREFIX) for n in names),
    }
    return [f"{what} is missing" for what, found in wanted.items() if not found]


def check_checkpoint(checkpoint: Path) -> list[str]:
    """What makes a checkpoint unusable for a resume (missing, cut-short or changed files), or ``[]``.

    A sealed checkpoint's files must match its manifest; one written before manifests existed gets the
    structural checks (JSON parses, safetensors headers, torch archives whole)."""
    checkpoint = Path(checkpoint)
    problems = _required_problems(checkpoint)
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        files = [p for p in checkpoint.rglob("*") if p.is_file()]
        return problems + [p for p in map(_check_file, files) if p is not None]
    try:
        listed = read_json(manifest)["files"]
        entries = [(name, int(size), str(digest)) for name, (size, digest) in listed.items()]
    except (ConfigError, TypeError, KeyError, ValueError, AttributeError):
        return [*problems, f"{MANIFEST_FILE} is unreadable"]
    for name, size, digest in entries:
        file = checkpoint / name
        if not file.is_file():
            if not any(name in problem for problem in problems):  # not already named as required
                problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} is {file.stat().st_size} bytes, {size} when it was saved (cut short)")
        elif sha256_file(file) != digest:
            problems.append(f"{name} does not match its SHA-256 from the save (changed or damaged)")
    return problems


# --- storage ------------------------------------------------------------------------------------------------


def check_writable(directory: Path) -> None:
    """Create ``directory`` (and its parents) if needed and write a file in it.

    Raises:
        StorageError: the directory cannot be created or written to.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".lorakit-write-test-"):
            pass
    except OSError as error:
        raise StorageError(
            f"train({str(directory)!r}): cannot write to the output directory ({error.strerror or error}). "
            "Pick a directory you can write to (a local disk, or a mounted drive with write access)."
        ) from error


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise StorageError when the file system of ``directory`` has less than ``needed`` bytes free."""
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise StorageError(
            f"train({str(directory)!r}): {what} need about {needed / 1e6:,.1f} MB, but only "
            f"{free / 1e6:,.1f} MB are free there. Free some space, write the run elsewhere, keep fewer "
            "checkpoints (with_checkpoints(keep=N)) or save less often."
        )


@contextlib.contextmanager
def storage_guard(directory: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC / EDQUOT, or torch's "file write failed" on a full disk) while writing into a
    run directory into a :class:`StorageError` saying what was kept."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(error, RuntimeError) and "file write failed" in str(error):
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(directory).free < 1 << 20
        if not full:
            raise
        kept = list_checkpoints(Path(directory) / CHECKPOINTS_DIR)
        last = (
            f"the last complete checkpoint, {kept[-1]}, is intact" if kept else "no checkpoint was complete"
        )
        raise StorageError(
            f"The disk is full while writing into {directory} ({error}). Checkpoints are published only once "
            f"complete, so {last}. Free some space (or keep fewer checkpoints: with_checkpoints(keep=N)), then "
            "continue with train(dir, resume=True)."
        ) from error


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
    """The checkpoint to resume from: the latest complete one in ``output_dir`` (``resume=True``) or the given
    one (a checkpoint, a run directory or a checkpoints directory).

    A checkpoint that fails :func:`check_checkpoint` (a file missing, cut short or changed since its save) is
    skipped with a warning naming it and why, for the previous complete one; a checkpoint given by path must
    itself be complete.

    Raises:
        CorruptArtifactError: the checkpoint given by path is incomplete.
        ConfigError: no such directory, or no complete checkpoint in it.
    """
    if resume is True:
        where = output_dir / CHECKPOINTS_DIR
    else:
        where = Path(str(resume)).expanduser()
        if (where / STATE_FILE).is_file():
            problems = check_checkpoint(where)
            if problems:
                raise CorruptArtifactError(
                    f"Cannot resume from {where}: it is incomplete:\n  - " + "\n  - ".join(problems) + "\n"
                    "Resume from another checkpoint, or pass resume=True to take the latest complete one."
                )
            return where
        if (where / CHECKPOINTS_DIR).is_dir():
            where = where / CHECKPOINTS_DIR
        elif not where.is_dir():
            raise ConfigError(
                f"train(resume={str(resume)!r}): no such directory. Pass a checkpoint directory "
                f"(…/{CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}<step>), a run directory, or resume=True."
            )
    skipped = []
    for checkpoint in reversed(list_checkpoints(where)):
        problems = check_checkpoint(checkpoint)
        if not problems:
            if skipped:
                warnings.warn(
                    f"Skipping incomplete checkpoints ({'; '.join(skipped)}); resuming from {checkpoint.name}.",
                    stacklevel=3,
                )
            return checkpoint
        skipped.append(f"{checkpoint.name}: {', '.join(problems)}")
    raise ConfigError(
        f"train(resume=...): no complete checkpoint in {where}"
        + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
        + ". Checkpoints are written by .with_checkpoints(every=N) (or with_training(save_steps=N)); start a "
        "new run without resume."
    )


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
    _fsync(checkpoints_dir)  # the rename itself reaches the disk
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty
    return final


def clean_staging(checkpoints_dir: Path, *, quiet: bool = False) -> None:
    """Remove what a crash (or a failed save: ``quiet``) left half-written."""
    staging = checkpoints_dir / STAGING_DIR
    if staging.exists():
        if not quiet:
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
    def report_html_file(self) -> Path:
        return self.path / REPORT_HTML

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
        """Move a previous run's outputs aside into ``.lorakit-replaced/`` (``overwrite=True``), weights first:
        from then on nothing of the old run poses as the new one, even after a crash. A fresh run must not
        append to its logs, rotate or resume its checkpoints. :meth:`drop_replaced` removes them at the end."""
        aside = self.path / REPLACED_DIR
        if aside.exists():  # left by an earlier overwrite that crashed: that run was to be replaced anyway
            shutil.rmtree(aside)
        old = [p for p in self._run_outputs() if p.exists()]
        if not old:
            return
        aside.mkdir()
        for path in old:
            target = aside / path.relative_to(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        _fsync(self.path)

    def _run_outputs(self) -> list[Path]:
        """What a run writes at the top of its directory, weights first (files of other kinds stay)."""
        weights = [*_weight_files(self.path), *(self.path / name for name in PICKLED_WEIGHTS)]
        kinds = ("*.json", "*.jsonl", "*.jinja", "*.model", "*.txt", "*.md", "*.png")
        named = [p for kind in kinds for p in sorted(self.path.glob(kind)) if p.name != LOCK_FILE]
        dirs = [self.checkpoints_dir, self.tensorboard_dir, self.path / WANDB_DIR]  # data/: maybe the source
        return [*weights, *named, *dirs]

    def drop_replaced(self) -> None:
        """Remove the outputs of the run this one replaced (its save is complete)."""
        shutil.rmtree(self.path / REPLACED_DIR, ignore_errors=True)

    def prepare_resume(self, checkpoint: Path) -> None:
        """Before resuming from ``checkpoint``: drop what a crash left half-written (the staging directory,
        later checkpoints that are incomplete), log lines past the checkpoint's step, and the final outputs
        the resumed run writes again."""
        clean_staging(checkpoint.parent)
        step = checkpoint_step(checkpoint)
        for later in list_checkpoints(checkpoint.parent):
            if checkpoint_step(later) > step and check_checkpoint(later):
                shutil.rmtree(later)
        self.truncate_logs(step)
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

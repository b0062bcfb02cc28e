"""One exception hierarchy for everything lorakit raises on purpose.

Every message names the field (or file / row), the value received and what to do instead.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptArtifactError",
    "DataError",
    "LorakitError",
    "MissingDependencyError",
    "RunLockedError",
    "StorageError",
    "TrainingError",
]


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A builder call or config value is invalid, or conflicts with an earlier call."""


class DataError(LorakitError, ValueError):
    """A dataset source, row or field cannot be used; the message names the file, row and field."""


class MissingDependencyError(LorakitError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


class TrainingError(LorakitError, RuntimeError):
    """Training had to stop (e.g. the loss became NaN / inf); the message names the step and what was kept."""


class CorruptArtifactError(ConfigError):
    """A file of a run directory or checkpoint is missing, truncated, unreadable or fails its checksum; the
    message names the file and what to do (re-copy it, resume from another checkpoint, train again)."""


class RunLockedError(ConfigError):
    """Another live process holds the run directory's lock (it is training into it); the message names the
    holder (pid, host, since)."""


class StorageError(LorakitError, OSError):
    """The disk could not take what a run writes (no space, not writable); the message says what was kept."""

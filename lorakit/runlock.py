"""One writer per run directory: the advisory lock ``train()`` holds for the whole run.

The lock is a small JSON file in the run directory (``rundir.LOCK_FILE``) naming its holder: pid, host, the
process's start time and since when it holds the lock. It is created atomically (written aside, then hard-linked
into place, which fails if a lock exists) and removed when the run ends, also on errors. A lock whose process is
gone (same host, no such pid, or a pid reused by another process) is stale and taken over with a warning; a lock
from another host is honoured until removed by hand, since lorakit cannot see that host's processes. (Two
processes taking over the same stale lock at the same instant could both proceed; the window is the time
between reading and replacing the lock file.)

Example:
    >>> from lorakit.runlock import lock_holder
    >>> lock_holder("runs/nothing-here") is None
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit import rundir as rd
from lorakit.errors import ConfigError, RunLockedError

__all__ = ["RunLock", "describe_holder", "lock_holder", "readable_run"]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_live(holder: dict[str, Any]) -> bool:
    """Whether the holder may still be running: always for another host; on this host, its pid exists and
    (where known) started when the lock says."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    started, recorded = _start_time(pid), holder.get("process_start")
    return started is None or recorded is None or started == recorded


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable: treated as stale
    return holder if isinstance(holder, dict) else {}


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The live holder of a run directory's lock (``pid``, ``host``, ``since``), or None."""
    holder = _read(Path(run_dir).expanduser() / rd.LOCK_FILE)
    return holder if holder and _is_live(holder) else None


def describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, since {holder.get('since')}"


class RunLock:
    """The lock of one run directory. ``acquire()`` raises :class:`RunLockedError` naming a live holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).expanduser()
        self.path = self.run_dir / rd.LOCK_FILE
        self.held = False
        self._created_dir = False

    def acquire(self) -> None:
        self._created_dir = not self.run_dir.exists()
        rd.check_writable(self.run_dir)  # a StorageError before anything else
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "process_start": _start_time(os.getpid()),
        }
        for _ in range(3):
            if self._create(record):
                self.held = True
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if _is_live(holder):
                raise RunLockedError(
                    f"{self.run_dir} is being written by another process ({describe_holder(holder)}): one "
                    "run directory takes one writer. Wait for that run to end, or train into another "
                    f"directory. If that process is gone (e.g. on another machine), delete {self.path}."
                )
            warnings.warn(
                f"Taking over the stale lock of {self.run_dir} ({describe_holder(holder)}: that process is gone).",
                stacklevel=3,
            )
            self.path.unlink(missing_ok=True)
        raise ConfigError(f"Could not take the lock {self.path}: other processes keep taking it.")

    def _create(self, record: dict[str, Any]) -> bool:
        """Write the lock aside and link it into place (readers never see half a lock); on file systems without
        hard links (some network / FUSE mounts) create it exclusively and write it. False when a lock exists."""
        text = json.dumps(record) + "\n"
        tmp = self.run_dir / f".{rd.LOCK_FILE}.{os.getpid()}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Remove the lock if this process holds it (and the directory if acquiring created it and it is
        empty)."""
        if not self.held:
            return
        holder = _read(self.path)
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when empty: a run that failed before writing anything

    @classmethod
    @contextlib.contextmanager
    def hold(cls, run_dir: str | Path, *, active: bool = True) -> Iterator[RunLock | None]:
        """Hold the lock for the block (not taken when ``active`` is False: the non-main processes of a
        distributed run, whose main process holds it)."""
        if not active:
            yield None
            return
        lock = cls(run_dir)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()


def readable_run(path: Path) -> Path:
    """The directory to load for ``path``: itself, or while a live process trains into it, its last complete
    checkpoint (with a warning).

    Raises:
        ConfigError: training is in progress and no checkpoint is complete yet.
    """
    holder = lock_holder(path) if Path(path).is_dir() else None
    if holder is None:
        return path
    run = rd.RunDir(path)
    complete = [c for c in run.checkpoints() if not rd.check_checkpoint(c)]
    if not complete:
        raise ConfigError(
            f"{path} is still being trained ({describe_holder(holder)}) and has no complete checkpoint yet: "
            "there is no finished adapter to load. Wait for the run to end (or for its first checkpoint: "
            "with_checkpoints(every=N))."
        )
    warnings.warn(
        f"{path} is still being trained ({describe_holder(holder)}); loading its last complete checkpoint, "
        f"{complete[-1].name}.",
        stacklevel=3,
    )
    return complete[-1]

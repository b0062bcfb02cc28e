"""Progress bars on long work (tqdm on stderr); ``LORAKIT_PROGRESS=0`` turns them off."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled() -> bool:
    """False when ``LORAKIT_PROGRESS=0`` (tests, logs); training's own bars follow the same switch."""
    return os.environ.get("LORAKIT_PROGRESS", "1") != "0"


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """``iterable`` wrapped in a tqdm bar on stderr, or unchanged when progress bars are off."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    bar: Any = tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    try:
        yield from bar
    finally:
        bar.close()

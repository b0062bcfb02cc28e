"""Third-party noise lorakit has already handled: silenced around lorakit's own calls only, listed here once.

:func:`quiet` is a context manager that lorakit wraps around its own work (``train()``, the CLI's loading and
generation). Inside it, the warnings in :data:`SILENCED_WARNINGS` are ignored and the loggers in
:data:`QUIETED_LOGGERS` show errors only; on exit, the warning filters and logger levels are exactly what they
were. Nothing here runs at import, no filter is global, and a warning that is not in the table (the user's own,
or a third-party one lorakit has not handled) still shows.

Each entry says why lorakit may silence it: a deprecation lorakit itself triggers (through PEFT / TRL) with no
effect on the run, or a setting lorakit makes on purpose and reports in its own words.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import attrs

__all__ = [
    "QUIETED_LOGGERS",
    "SILENCED_WARNINGS",
    "QuietedLogger",
    "SilencedWarning",
    "quiet",
    "quiet_logger",
]


@attrs.frozen
class SilencedWarning:
    """One warning lorakit silences inside its own calls."""

    module: str
    """Regex of the module the warning is attributed to (``warnings.filterwarnings(module=...)``)."""
    category: type[Warning]
    """The warning class."""
    message: str
    """Regex matching the start of the message."""
    why: str
    """Why it is safe to silence: what lorakit already did about it."""


@attrs.frozen
class QuietedLogger:
    """One library logger lorakit turns down to errors inside its own calls."""

    name: str
    """The ``logging`` logger name."""
    why: str
    """What it would print, and why lorakit's console already covers it."""


SILENCED_WARNINGS: tuple[SilencedWarning, ...] = (
    SilencedWarning(
        module=r"transformers\.modeling_utils",
        category=FutureWarning,
        message=r"`is_gradient_checkpointing` is deprecated",
        why="PEFT and TRL read the deprecated alias when lorakit applies an adapter; lorakit decides gradient "
        "checkpointing itself (plan.decide_grad_checkpointing) and the alias still answers correctly.",
    ),
    SilencedWarning(
        module=r"transformers\.training_args",
        category=FutureWarning,
        message=r"`gradient_checkpointing` is deprecated",
        why="lorakit passes `gradient_checkpointing` to TRL's SFTConfig on purpose: TRL 1.x reads that field "
        "(not `activation_checkpointing`); the decision is shown in `explain()`.",
    ),
)
"""The warnings silenced inside :func:`quiet`, with the reason for each."""

QUIETED_LOGGERS: tuple[QuietedLogger, ...] = (
    QuietedLogger(
        "transformers",
        "advisory notes such as 'The tokenizer has new PAD/BOS/EOS tokens ...': lorakit sets the pad token on "
        "purpose (models.load_tokenizer) and the run record keeps the tokenizer it trained with.",
    ),
    QuietedLogger(
        "bitsandbytes",
        "'Failed to load CPU gemm_4bit_forward from kernels-community' offline: bitsandbytes falls back to its "
        "own kernel, and the result is the same.",
    ),
    QuietedLogger(
        "kernels",
        "'Skipping publisher trust check ... offline mode': an offline notice about a cached kernel.",
    ),
)
"""The loggers shown at ERROR level only inside :func:`quiet` (errors still show)."""


@contextlib.contextmanager
def quiet(*, progress_bars: bool = True) -> Iterator[None]:
    """Silence :data:`SILENCED_WARNINGS` and :data:`QUIETED_LOGGERS` for the duration of the block.

    ``progress_bars=False`` also hides transformers' and datasets' own progress bars (weight loading, ``map``)
    inside the block: the console does so when output is not a terminal or ``LORAKIT_PROGRESS=0``. Everything
    is restored on exit, whether the block raised or not.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.get_verbosity()  # transformers sets its logger's level on first use: let it happen before ours
    levels = {entry.name: logging.getLogger(entry.name).level for entry in QUIETED_LOGGERS}
    bars = hf_logging.is_progress_bar_enabled()
    datasets_bars = _datasets_bars(None)
    with warnings.catch_warnings():
        for entry in SILENCED_WARNINGS:
            warnings.filterwarnings("ignore", entry.message, entry.category, entry.module)
        for name in levels:
            logging.getLogger(name).setLevel(logging.ERROR)
        if not progress_bars:
            hf_logging.disable_progress_bar()
            _datasets_bars(False)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            if bars and not progress_bars:
                hf_logging.enable_progress_bar()
            if datasets_bars and not progress_bars:
                _datasets_bars(True)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """One logger at ERROR level for the block, for a library that sets its own level when imported (MLflow:
    its store prints 'Creating initial MLflow database tables...' at INFO on first use)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _datasets_bars(enable: bool | None) -> bool:
    """Whether datasets shows progress bars (``enable=None``), or switch them on / off."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    if enable is True:
        ds_logging.enable_progress_bar()
    elif enable is False:
        ds_logging.disable_progress_bar()
    return was

"""Data preparation: loading, converting, cleaning, splitting, tokenizing and label masking.

Labels are made here, once; collators only pad. The flow of :func:`prepare_data`:

    source -> rows (load_source) -> messages (to_messages) -> clean / split -> Encoded (encode) -> Dataset

Accepted row formats (see :func:`detect_format`): alpaca (``instruction``, ``input``, ``output``,
``system``), prompt/completion (``prompt``, ``completion``) and chat ``messages``.
"""

from __future__ import annotations

from lorakit.data.encode import IGNORE_INDEX, Encoded, encode, encode_prompt
from lorakit.data.formats import FORMATS, Format, detect_format, to_messages
from lorakit.data.load import load_source
from lorakit.data.prepare import DataReport, PreparedData, count_rows, prepare_data, split_indices

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataReport",
    "Encoded",
    "Format",
    "PreparedData",
    "count_rows",
    "detect_format",
    "encode",
    "encode_prompt",
    "load_source",
    "prepare_data",
    "split_indices",
    "to_messages",
]

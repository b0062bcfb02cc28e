"""Data preparation: loading, converting, cleaning, splitting, tokenizing and label masking.

Labels are made here, once; collators only pad. The flow of :func:`prepare_data`:

    source -> rows (load_source) -> messages (to_messages) -> clean / split -> Encoded (encode) -> Dataset

Accepted row formats (see :func:`detect_format`): alpaca (``instruction``, ``input``, ``output``,
``system``), prompt/completion (``prompt``, ``completion``), chat ``messages`` (OpenAI style), ShareGPT
``conversations`` (from / value) and raw ``text``; ``columns=`` maps other column names.
"""

from __future__ import annotations

from lorakit.data.encode import IGNORE_INDEX, OVERFLOW_POLICIES, Encoded, encode, encode_prompt
from lorakit.data.formats import FORMATS, Format, detect_format, rename_columns, to_messages
from lorakit.data.load import load_source, read_source
from lorakit.data.prepare import (
    BAD_ROW_POLICIES,
    DataReport,
    PreparedData,
    cache_dir,
    count_rows,
    pack,
    prepare_data,
    split_indices,
)
from lorakit.data.preview import Preview, preview_examples

__all__ = [
    "BAD_ROW_POLICIES",
    "FORMATS",
    "IGNORE_INDEX",
    "OVERFLOW_POLICIES",
    "DataReport",
    "Encoded",
    "Format",
    "PreparedData",
    "Preview",
    "count_rows",
    "detect_format",
    "encode",
    "cache_dir",
    "encode_prompt",
    "load_source",
    "pack",
    "prepare_data",
    "preview_examples",
    "read_source",
    "rename_columns",
    "split_indices",
    "to_messages",
]

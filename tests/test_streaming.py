"""True streaming (``with_dataset(..., streaming=True)``): rows are read, encoded and masked as the trainer draws
batches, by the in-memory path's code; the run reads what its steps consume, and counts what it read.

The Hub is unreachable in tests: ``datasets.load_dataset("org/corpus", ...)`` is redirected to the ``json``
builder over a local JSONL "corpus", streamed by the real ``datasets`` code; every row it yields is counted.
"""

from __future__ import annotations

import itertools
import json

import pytest

import lorakit as lk
from lorakit.collate import PadCollator
from lorakit.config import DataSpec, TrainSpec
from lorakit.data import IGNORE_INDEX, prepare_data
from lorakit.data.stream import CHUNK_ROWS, prepare_stream
from lorakit.errors import ConfigError
from lorakit.plan import stream_rows
from lorakit.rundir import RunDir

N_ROWS = 2000
BAD_ROW = 3


def _row(i: int) -> dict[str, str]:
    if i == BAD_ROW:
        return {"instruction": "A row without its output."}
    return {"instruction": f"Question {i}: " + "word " * (i % 7), "output": f"Answer {i}."}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(N_ROWS)))
    return path


@pytest.fixture
def stream(monkeypatch, corpus):
    """``load_dataset("org/corpus", streaming=True)`` streams the local JSONL; rows yielded are counted."""
    import datasets

    real = datasets.load_dataset
    seen: dict[str, list] = {"calls": [], "streamed": []}

    class Counted:
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            for row in self.rows:
                seen["streamed"].append(row)
                yield row

    def load_dataset(path, name=None, *, split=None, streaming=False):
        seen["calls"].append((path, name, split, streaming))
        assert path == "org/corpus" and streaming, (path, streaming)
        return Counted(real("json", data_files=str(corpus), split=split, streaming=True))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return seen


def _spec(**options) -> DataSpec:
    defaults = {
        "template": "alpaca",
        "val_split": 0.0,
        "max_length": 64,
        "on_bad_row": "skip",
        "cache": False,
    }
    return DataSpec("org/corpus", streaming=True, **{**defaults, **options})


def test_the_stream_encodes_rows_as_the_in_memory_path_does(tiny_tokenizer, stream):
    spec = _spec()
    prepared = prepare_stream(
        spec.source,
        tokenizer=tiny_tokenizer,
        template="alpaca",
        val_rows=0,
        planned_rows=8,
        probe_examples=4,
        **spec.prepare_kwargs(),
    )
    probe_read = len(stream["streamed"])
    assert probe_read == CHUNK_ROWS  # the probe encoded one chunk for the audit, not the corpus
    prepared.stream.start()
    first = list(itertools.islice(iter(prepared.train), 4))
    pad = 0  # the tiny tokenizer has no pad token (lorakit sets one when it loads a tokenizer)
    batch = PadCollator(pad)(first)
    # The same rows through prepare_data (the bad row skipped there too): identical tensors.
    rows = [_row(i) for i in range(5) if i != BAD_ROW]
    memory = prepare_data(
        rows, tokenizer=tiny_tokenizer, template="alpaca", val_split=0, max_length=64, cache=False
    )
    expected = PadCollator(pad)(memory.train.to_list())
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["labels"].tolist() == expected["labels"].tolist()
    # Only the response (and its end of turn) is trained: the prompt is masked.
    for row, labels in zip(first, batch["labels"].tolist(), strict=True):
        trained = [token for token in labels if token != IGNORE_INDEX]
        assert labels[0] == IGNORE_INDEX and 0 < len(trained) < len(row["input_ids"])
    answers = [
        tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in batch["labels"].tolist()
    ]
    assert [answer.split(".")[0].strip() for answer in answers] == [
        "Answer 0",
        "Answer 1",
        "Answer 2",
        "Answer 4",
    ]
    # Reading 4 examples read one chunk of the corpus, and the report counts it, the bad row named.
    assert len(stream["streamed"]) - probe_read == CHUNK_ROWS
    report = prepared.report
    assert (report.streamed, report.rows_loaded, report.skipped_bad_rows) == (True, CHUNK_ROWS, 1)
    assert report.bad_row_examples[0].startswith(f"org/corpus (train, streamed), row {BAD_ROW}")
    assert report.train_rows == CHUNK_ROWS - 1  # the chunk's examples, encoded together


def test_the_validation_head_is_held_out(tiny_tokenizer, stream):
    spec = _spec(val_split=0.2)
    assert stream_rows(TrainSpec(max_steps=2, batch_size=2), spec) == (4, 1)  # 20% of 5 rows, at the head
    prepared = prepare_stream(
        spec.source,
        tokenizer=tiny_tokenizer,
        template="alpaca",
        val_rows=1,
        planned_rows=4,
        probe_examples=2,
        **spec.prepare_kwargs(),
    )
    prepared.stream.start()
    memory = prepare_data(
        [_row(0), _row(1)],
        tokenizer=tiny_tokenizer,
        template="alpaca",
        val_split=0,
        max_length=64,
        cache=False,
    )
    assert [row["input_ids"] for row in prepared.val.to_list()] == [memory.train[0]["input_ids"]]
    assert next(iter(prepared.train))["input_ids"] == memory.train[1]["input_ids"]  # training starts after it


def test_what_a_stream_cannot_do_is_refused(tiny_model_dir, tmp_path):
    base = lk.Pipeline.from_model(tiny_model_dir).with_training(max_steps=2)
    packed = base.with_dataset("org/corpus", streaming=True, packing=True)
    with pytest.raises(ConfigError, match=r"streaming=True, packing=True\): .* Drop packing=True"):
        packed.train(tmp_path / "packed")
    saving = base.with_dataset("org/corpus", streaming=True).with_training(save_steps=1)
    with pytest.raises(ConfigError, match=r"streaming=True\) with checkpoints .* Drop the checkpoints"):
        saving.train(tmp_path / "saving")


def test_a_streamed_run_reads_what_its_steps_consume_and_records_it(tiny_model_dir, stream, tmp_path):
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4)
        .with_dataset(
            "org/corpus", streaming=True, template="alpaca", val_split=0.0, max_length=64, on_bad_row="skip"
        )
        .with_training(max_steps=3, batch_size=2)
    )
    plan = pipeline.plan()
    assert (plan.train_rows, plan.val_rows, plan.total_steps) == (6, 0, 3) and stream["streamed"] == []
    result = pipeline.train(tmp_path / "run")
    read = len(stream["streamed"])
    # The probe's chunk, then 3 steps x 2 examples, the batch the loader fetches ahead and the chunk being
    # encoded: bounded by the steps, not by the 2000-row corpus.
    assert read <= CHUNK_ROWS + (3 * 2 + 2 + CHUNK_ROWS)
    assert result.metrics["train_steps"] == 3 and result.metrics["train_loss"] > 0
    report = RunDir(result.output_dir).read_run()["data_report"]
    assert report["streamed"] is True
    assert report["rows_loaded"] == read - CHUNK_ROWS  # what training read (the probe is not counted)
    assert report["skipped_bad_rows"] == 1 and f"row {BAD_ROW}" in report["bad_row_examples"][0]
    assert report["train_rows"] == report["rows_loaded"] - 1
    assert result.data_report["rows_loaded"] == report["rows_loaded"]

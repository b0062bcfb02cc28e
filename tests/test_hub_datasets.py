"""Hub datasets with config / split / streaming, through ``datasets.load_dataset``.

The Hub is unreachable in tests, so ``datasets.load_dataset`` is redirected from the Hub id to a local dataset
folder (a README with two configs and train/test splits): everything after the id — config and split
selection, streaming, lorakit's row limit — runs through the real ``datasets`` code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lorakit as lk
from lorakit.config import HubDataset
from lorakit.data.stream import CHUNK_ROWS
from lorakit.errors import ConfigError, DataError

README = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: small-train.jsonl
  - split: test
    path: small-test.jsonl
- config_name: full
  data_files:
  - split: train
    path: full-train.jsonl
---
"""


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("org-tickets")
    for name, n, tag in (
        ("small-train", 30, "small"),
        ("small-test", 5, "test"),
        ("full-train", 200, "full"),
    ):
        rows = [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "README.md").write_text(README)
    return folder


@pytest.fixture
def hub(monkeypatch, hub_folder):
    """``load_dataset("org/tickets", ...)`` reads the local folder; every call and every streamed row is counted."""
    import datasets

    real = datasets.load_dataset
    seen: dict[str, list] = {"calls": [], "streamed": []}

    class Counted:
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            for row in self.stream:
                seen["streamed"].append(row)
                yield row

    def load_dataset(path, name=None, *, split=None, streaming=False):
        seen["calls"].append((path, name, split, streaming))
        assert path == "org/tickets", path
        loaded = real(str(hub_folder), name, split=split, streaming=streaming)
        return Counted(loaded) if streaming else loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return seen


def test_config_and_split_select_the_rows(tiny_model_dir, hub):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(
        "org/tickets",
        config="small",
        split="test",
        template="alpaca",
        val_split=0.0,
        max_length=64,
        cache=False,
    )
    assert isinstance(pipeline.data.source, HubDataset) and pipeline.data.source == "org/tickets"
    prepared = pipeline.prepare_data()
    assert len(prepared.train) == 5 and prepared.report.rows_loaded == 5
    assert hub["calls"] == [("org/tickets", "small", "test", False)]
    default_split = lk.Pipeline.from_model(tiny_model_dir).with_dataset(
        "org/tickets", config="full", template="alpaca", val_split=0.0, max_length=64, cache=False
    )
    assert len(default_split.prepare_data().train) == 200
    assert hub["calls"][-1] == ("org/tickets", "full", "train", False)


def test_streaming_reads_only_the_rows_max_steps_consumes(tiny_model_dir, hub):
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_dataset(
            "org/tickets", config="full", streaming=True, template="alpaca", val_split=0.2, max_length=64
        )
        .with_training(max_steps=3, batch_size=2, grad_accum=2)
    )
    plan = pipeline.plan()
    # 3 steps x 2 x 2 = 12 training rows; with 20% held out for validation, 15 rows: counted, not read.
    assert (plan.train_rows, plan.val_rows, plan.total_steps) == (12, 3, 3)
    assert hub["streamed"] == [] and hub["calls"] == []
    # prepare_data() / preview() / audit() read those 15 rows (not 200) and prepare them in memory.
    assert pipeline.prepare_data().report.rows_loaded == 15
    assert len(hub["streamed"]) == 15
    assert hub["calls"] == [("org/tickets", "full", "train", True)]


def test_streaming_trains(tiny_model_dir, hub, tmp_path):
    result = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4)
        .with_dataset(
            "org/tickets", config="full", streaming=True, template="alpaca", val_split=0.0, max_length=64
        )
        .with_training(max_steps=2, batch_size=2)
        .train(tmp_path / "run")
    )
    # Read lazily (lorakit.data.stream): the probe's chunk and one chunk for 2 steps x 2 rows, not 200 rows.
    assert len(hub["streamed"]) == 2 * CHUNK_ROWS and result.metrics["train_loss"] > 0


def test_streaming_needs_max_steps(tiny_model_dir, tmp_path):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset("org/tickets", streaming=True)
    with pytest.raises(ConfigError, match=r"streaming=True\) .* set with_training\(max_steps=...\)"):
        pipeline.plan()
    with pytest.raises(ConfigError, match=r"set with_training\(max_steps=...\)"):
        pipeline.train(tmp_path / "run")
    from lorakit.data.load import read_source

    with pytest.raises(DataError, match="is streamed: lorakit reads only the rows"):
        read_source(HubDataset("org/tickets", streaming=True))


def test_hub_options_need_a_hub_id(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"config=/split=/streaming=\) are for Hub dataset ids"):
        lk.Pipeline.from_model("m").with_dataset(str(data), split="train")
    with pytest.raises(ConfigError, match="are for Hub dataset ids"):
        lk.Pipeline.from_model("m").with_dataset([{"instruction": "a", "output": "b"}], streaming=True)


def test_hub_options_survive_a_config_round_trip(tmp_path):
    pipeline = lk.Pipeline.from_model("m").with_dataset("org/tickets", config="full", split="train[:10%]")
    path = pipeline.save_config(tmp_path / "config.yaml")
    again = lk.Pipeline.from_config(Path(path))
    assert again == pipeline
    assert isinstance(again.data.source, HubDataset)
    assert (again.data.source.config, again.data.source.split) == ("full", "train[:10%]")

"""report.html: written by every run, self-contained, rebuilt by `lorakit report`, shown by TrainResult."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.rundir import REPORT_HTML, RunDir, write_json_atomic
from lorakit.tracking.html import histogram_chart, line_chart

ROWS = [
    {"instruction": "Route this ticket.", "input": f"ticket {i}: my parcel never came.", "output": "shipping"}
    for i in range(12)
]


class Page(HTMLParser):
    """What the tests look at: section ids, svg charts, <mark> spans, table cells, external references."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.svgs = self.marks = 0
        self.cells: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.sections += [attrs["id"]] if tag == "section" else []
        self.svgs += tag == "svg"
        self.marks += tag == "mark"
        self.scripts += tag in ("script", "link", "img", "iframe")
        self._cell = tag == "td"
        for name in ("src", "href"):
            if str(attrs.get(name, "")).startswith(("http://", "https://", "//")):
                self.external.append(attrs[name])

    def handle_data(self, data):
        if self._cell:
            self.cells.append(data)
            self._cell = False


@pytest.fixture(scope="module")
def report_run(tiny_model_dir, tmp_path_factory):
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(ROWS, template="alpaca", val_split=0.25, max_length=24)
        .with_training(max_steps=4, batch_size=4, lr=5e-3, logging_steps=1, eval_steps=2)
        .log_samples(n=2, max_new_tokens=4, every=2)
    )
    return pipeline.train(tmp_path_factory.mktemp("report") / "run")


def test_every_run_writes_a_self_contained_report(report_run):
    path = report_run.output_dir / REPORT_HTML
    page = Page(path.read_text())
    assert page.sections == ["plan", "metrics", "curves", "lengths", "examples", "samples"]
    assert page.svgs == 4  # loss, learning rate, token lengths (+ eval metrics: mean token accuracy)
    assert page.external == [] and page.scripts == 0
    assert page.marks >= 3  # three examples, each with its trained reply highlighted
    assert "max_length 24" in path.read_text() and "shipping" in path.read_text()
    assert str(report_run.metrics["train_steps"]) in page.cells and "base model" in page.cells


def test_lorakit_report_rebuilds_it_with_the_before_after_table(report_run, capsys):
    run = RunDir(report_run.output_dir)
    write_json_atomic(run.quickstart_file, {"before": 0.0, "after": 0.9, "test_rows": 20})
    run.report_html_file.unlink()
    assert main(["report", str(run.path)]) == 0
    assert capsys.readouterr().out == f"lorakit: report written to {run.report_html_file}\n"
    page = Page(run.report_html_file.read_text())
    assert page.sections[:3] == ["plan", "metrics", "before-after"]
    assert ["held-out exact match", "0.0%", "90.0%"] == page.cells[
        page.cells.index("held-out exact match") :
    ][:3]
    run.quickstart_file.unlink()


def test_report_of_a_directory_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"lorakit: error: {tmp_path} holds no lorakit_run.json; pass a lorakit run directory.\n"
    )


def test_train_result_shows_the_summary_in_a_notebook(report_run):
    page = Page(report_run._repr_html_())
    assert page.sections == ["metrics", "curves", "plan"] and page.svgs >= 2


def test_charts_escape_names_and_mark_the_cut():
    svg = line_chart({"<loss>": [(1, 2.0), (2, 1.0)]}, "t", "y")
    assert "&lt;loss&gt;" in svg and "<loss>" not in svg and svg.count("<circle") == 2
    hist = histogram_chart({"counts": [1, 0, 3], "bin_width": 10, "max_length": 25})
    assert hist.count("<rect") == 3 and "max_length 25" in hist
    assert line_chart({}, "t", "y") == "" and histogram_chart({}) == ""


def test_inference_model_rebuilds_the_report_of_its_run(report_run):
    path = report_run.output_dir / REPORT_HTML
    path.unlink()
    model = lk.InferenceModel.load(report_run.output_dir)
    assert model.report() == path and Page(path.read_text()).sections[0] == "plan"
    model.adapter_dir = None
    with pytest.raises(lk.errors.ConfigError, match="not loaded from a lorakit run directory"):
        model.report()

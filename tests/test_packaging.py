"""lorakit as a package, not a checkout: build the sdist and wheel, install the wheel into a fresh venv, run
`lorakit --help` and a tiny training from outside the checkout (catches package data missing from the wheel).

The venv reuses this interpreter's packages (``--system-site-packages``) and installs the wheel with
``--no-deps --no-index``: nothing is downloaded. Release steps: docs/releasing.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build")


def _run(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LORAKIT_PROGRESS="0")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lorakit", source / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    out = source / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)], cwd=source)
    (wheel,) = out.glob("lorakit-*.whl")
    (sdist,) = out.glob("lorakit-*.tar.gz")
    return source, wheel, sdist


def test_wheel_holds_every_module_and_the_package_data(dist):
    source, wheel, _ = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(source).as_posix() for p in (source / "lorakit").rglob("*") if p.is_file()}
    assert expected - names == set()  # every module, the bundled samples and py.typed
    assert {"lorakit/samples/support_tickets_train.jsonl", "lorakit/py.typed"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lorakit = lorakit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_help_and_a_tiny_training(dist, tiny_model_dir, tmp_path):
    _, wheel, _ = dist
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "lorakit"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    _run([*pip, str(wheel)], cwd=tmp_path)
    help_text = _run([str(script), "--help"], cwd=tmp_path).stdout
    assert "usage: lorakit" in help_text and "quickstart" in help_text and "runs" in help_text
    program = textwrap.dedent(
        f"""
        import json
        import lorakit as lk
        from lorakit.quickstart import sample_path
        assert lk.__file__.startswith({str(venv)!r}), lk.__file__  # the wheel, not the checkout
        data = sample_path("train")
        assert str(data).startswith({str(venv)!r}) and data.is_file(), data  # bundled data came with it
        rows = [json.loads(line) for line in data.read_text().splitlines()[:8]]
        result = (
            lk.Pipeline.from_model({tiny_model_dir!r})
            .with_lora(r=4, alpha=8)
            .with_dataset(rows, template="chatml", max_length=48)
            .with_training(max_steps=2, batch_size=2, logging_steps=1)
            .train("run")
        )
        print("trained", result.metrics["train_steps"], lk.__file__)
        """
    )
    out = _run([str(python), "-c", program], cwd=tmp_path)
    assert "trained 2 " in out.stdout and "lorakit done: 2 steps" in out.stdout
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "report.html").is_file()

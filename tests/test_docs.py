"""The docs site builds with ``mkdocs build --strict`` (broken links, bad docstrings and missing pages fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="install lorakit[docs]")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "reference" / "pipeline" / "index.html").read_text()
    assert "with_dataset" in api and "train_on_inputs" in api  # the API reference comes from the docstrings


def test_every_docs_page_is_in_the_nav():
    yml = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if page not in yml]
    assert not missing, f"docs pages missing from mkdocs.yml nav: {missing}"

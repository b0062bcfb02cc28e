"""SIGKILL a training run at a handful of points, resume, and get the uninterrupted run's adapter (issue 21 item 3).

The short profile of ``scripts/fault_inject.py`` (its ``CI_POINTS``); the script runs every kill point plus
timed kills and prints the table.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("fault_inject", ROOT / "scripts" / "fault_inject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    script = _script()
    work = tmp_path_factory.mktemp("faults")
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in script.ROWS))
    script.pipeline(tiny_model_dir, str(data)).train(work / "reference")
    return script, work, str(data), script.adapter(work / "reference")


# kill point -> (the step resumed from, the complete checkpoints the kill left)
EXPECTED = {
    "step:3": (2, [1, 2]),  # killed during step 3: checkpoints 1 and 2 are complete
    "save-seal:4": (3, [2, 3]),  # checkpoint-4 written but not sealed: never published
    "eval:4": (3, [2, 3]),  # the evaluation of step 4 runs before its save
    "final-weights": (6, [5, 6]),  # the final adapter torn in the run directory; checkpoint-6 is complete
}


@pytest.mark.parametrize("point", list(EXPECTED))
def test_killed_then_resumed_equals_the_uninterrupted_run(setup, tiny_model_dir, point):
    script, work, data, reference = setup
    assert tuple(script.CI_POINTS) == tuple(EXPECTED)
    row = script.trial(point, tiny_model_dir, data, work / "trials", reference)
    resumed_from, left = EXPECTED[point]
    assert row["killed"] and row["checkpoints"] == left
    assert row["resumed_from"] == resumed_from
    assert row["equal"], row  # within rtol 1e-5 / atol 1e-6
    assert row["leftovers"] == []  # the stale lock was taken over and released, no staging left
    assert row["skipped"] == []  # incomplete checkpoints are never published, so none needed skipping
    assert not row["old_adapter_posing"]

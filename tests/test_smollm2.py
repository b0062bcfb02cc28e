"""The real path end to end on the embedded SmolLM2-135M: the quickstart job, then merge and export."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from lorakit.quickstart import run_quickstart

    # 60 steps instead of the command's 100 keeps CI under 20 minutes; the 100-step numbers are in the README.
    return run_quickstart(tmp_path_factory.mktemp("qs") / "run", max_steps=60)


def test_quickstart_learns_the_held_out_task(quickstart):
    # The held-out tickets use other wording than the training ones: this is learning, not recall.
    # Measured on 2 CPU cores: 0% zero-shot, 90% after 100 steps (90 rows; 75.6% after 60 steps).
    assert quickstart["before"] < 0.3
    assert quickstart["after"] >= quickstart["before"] + 0.5
    assert quickstart["metrics"]["eval_loss"] < 1.0


def test_smollm2_merge_exports_a_plain_transformers_model(quickstart, tmp_path):
    from transformers import AutoModelForCausalLM

    import lorakit as lk

    model = lk.InferenceModel.load(quickstart["output_dir"])
    out = model.merge().save(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([model.encode({"instruction": "Route this ticket.", "input": "I was charged twice."})])
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model.model(input_ids=ids).logits, atol=1e-3, rtol=1e-3
        )

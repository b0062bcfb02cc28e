"""Values the builder used to let through: seeds numpy refuses, max_length beyond the model's context."""

from __future__ import annotations

import re

import pytest

import lorakit as lk
from lorakit.errors import ConfigError

ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("one", "two", "three", "four")]
SEED_FIX = (
    "the seed must be an integer from 0 to 2**32-1 (4294967295), the range numpy accepts. Use e.g. seed=42."
)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "42", True])
def test_a_seed_numpy_refuses_fails_at_with_training(seed):
    with pytest.raises(ConfigError) as caught:
        lk.Pipeline.from_model("some/model").with_training(seed=seed)
    assert str(caught.value) == f"with_training(seed={seed!r}): {SEED_FIX}"


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 1234])
def test_seeds_in_range_are_kept(seed):
    assert lk.Pipeline.from_model("some/model").with_training(seed=seed).training.seed == seed


def test_a_config_file_seed_is_checked_too(tmp_path):
    config = {"model": {"name_or_path": "some/model"}, "training": {"seed": -1}}
    with pytest.raises(ConfigError) as caught:
        lk.Pipeline.from_config(config)
    assert str(caught.value) == f"training.seed: -1: {SEED_FIX}"


def _pipe(model_dir, **data):
    return (
        lk.Pipeline.from_model(model_dir).with_lora(r=4).with_dataset(ROWS, val_split=0, cache=False, **data)
    )


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("max_length", [10**12, 513])
def test_max_length_beyond_the_context_fails_at_plan_and_train_before_loading(
    tiny_model_dir, tmp_path, monkeypatch, max_length, packing
):
    what = "packed sequences fill" if packing else "rows may reach"
    expected = (
        f"with_dataset(max_length={max_length}) is beyond the context of {tiny_model_dir} (512 positions, "
        f"max_position_embeddings): {what} {max_length} tokens, past every position the model was trained on. "
        "Use with_dataset(max_length=512) or less."
    )
    pipe = _pipe(tiny_model_dir, max_length=max_length, packing=packing).with_training(max_steps=1)
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        pipe.plan()
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the max_length check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_weights)
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        pipe.train(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_max_length_up_to_the_context_is_fine_and_the_default_beyond_it_warns(tiny_model_dir):
    assert _pipe(tiny_model_dir, max_length=512).plan().total_params > 0
    with pytest.warns(
        UserWarning, match=r"^The default max_length=1024 is beyond the context of .*\(512 positions"
    ):
        _pipe(tiny_model_dir).plan()

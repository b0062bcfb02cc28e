"""Every private third-party name lorakit relies on exists, with the parameters lorakit uses, in the installed
versions; the checker itself detects a missing name and a changed signature."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from lorakit.trainer import PRIVATE_NAMES, PrivateName, private_name_problems, unchecked_versions

LORAKIT = Path(__file__).parents[1] / "lorakit"


def test_every_private_name_exists_in_the_installed_versions():
    problems = private_name_problems()
    assert not problems, (
        "lorakit relies on private names the installed packages lack or changed (package version: name):\n  "
        + "\n  ".join(problems)
    )


def test_the_installed_versions_are_the_checked_ones():
    # Informational when it fails: re-check the names on the new version, then widen ``checked``.
    assert not unchecked_versions(), unchecked_versions()


def test_the_checker_detects_a_missing_name_and_a_changed_signature():
    installed = version("transformers")
    missing = PrivateName("transformers", "transformers.Trainer._no_such_method", "a fake entry")
    changed = PrivateName(
        "transformers", "transformers.Trainer._save_checkpoint", "a fake entry", params=("model", "epoch")
    )
    attribute = PrivateName(
        "transformers",
        "transformers.Trainer.no_such_attribute",
        "a fake entry",
        set_in="transformers.trainer",
    )
    module = PrivateName("transformers", "transformers.no_such_module._private", "a fake entry")
    absent = PrivateName("no-such-package-lorakit", "no_such_package._x", "skipped: not installed")
    problems = private_name_problems([missing, changed, attribute, module, absent])
    assert len(problems) == 4
    assert problems[0].startswith(
        f"transformers {installed}: transformers.Trainer._no_such_method (used by a fake"
    )
    assert "missing" in problems[0]
    assert problems[1] == (
        f"transformers {installed}: transformers.Trainer._save_checkpoint (used by a fake entry): parameters are "
        "('model', 'trial'), lorakit relies on ('model', 'epoch')"
    )
    assert problems[2].endswith("transformers.trainer no longer sets 'no_such_attribute'")
    assert "missing" in problems[3]
    old = PrivateName(
        "transformers", "transformers.Trainer.train", "a fake entry", checked=("4.0.0", "4.1.0")
    )
    assert unchecked_versions([old]) == [
        f"transformers.Trainer.train: checked on transformers 4.0.0-4.1.0, installed {installed}"
    ]


@pytest.mark.parametrize(
    "trainer_name",
    ["LorakitTrainer", "LorakitDPOTrainer", "LorakitKTOTrainer", "LorakitORPOTrainer", "LorakitCPOTrainer"],
)
def test_overridden_private_trainer_methods_are_listed(trainer_name):
    """Every private method a lorakit trainer class (or LorakitTrainerMixin) defines that its TRL trainer (or a
    base) also has is an override of a third-party private name: it must be in PRIVATE_NAMES."""
    from lorakit import trainer as trainers

    cls = getattr(trainers, trainer_name)
    third_party = next(base for base in cls.__mro__ if not base.__module__.startswith("lorakit"))
    lorakit_classes = [base for base in cls.__mro__ if base.__module__.startswith("lorakit")]
    own = {
        name
        for base in lorakit_classes
        for name in vars(base)
        if name.startswith("_") and not name.startswith("__")
    }
    overridden = {name for name in own if hasattr(third_party, name)}
    assert overridden, f"{trainer_name} overrides no private name? the check found nothing to check"
    listed = {entry.path.rsplit(".", 1)[1] for entry in PRIVATE_NAMES}
    assert overridden <= listed, overridden - listed


@pytest.mark.parametrize(
    "name",
    [
        "_save_checkpoint",
        "_get_output_dir",
        "_get_train_sampler",
        "_low_rank_decomposition",
        "_SafetensorLoader",
        "_model_mapping",
        "_no_split_modules",
        "_keep_in_fp32_modules",
        "support_avx512bf16_for_cpu",
        "base_model_prepare_inputs_for_generation",
    ],
)
def test_names_used_in_the_package_are_in_the_list(name):
    assert any(entry.path.endswith("." + name) for entry in PRIVATE_NAMES)


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda entry: entry.path)
def test_each_entry_names_the_module_that_uses_it(entry):
    module = LORAKIT / entry.used_by.split(":", 1)[0]
    assert module.is_file(), entry.used_by
    name = entry.path.rsplit(".", 1)[1]
    if module.name != "trainer.py":
        assert name in module.read_text(), f"{name} is not used in {module}"


def test_checkpoint_names_are_the_ones_rotate_checkpoints_finds():
    # rotate_checkpoints (called after each atomic checkpoint) lists "<PREFIX_CHECKPOINT_DIR>-<step>" directories.
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from lorakit import rundir

    assert rundir.checkpoint_name(7) == f"{PREFIX_CHECKPOINT_DIR}-7" == "checkpoint-7"
    entry = next(e for e in PRIVATE_NAMES if e.path.endswith(".PREFIX_CHECKPOINT_DIR"))
    assert entry.value == "checkpoint"
    installed = version("transformers")
    renamed = PrivateName(
        "transformers", "transformers.trainer_utils.PREFIX_CHECKPOINT_DIR", "a fake entry", value="ckpt"
    )
    assert private_name_problems([renamed]) == [
        f"transformers {installed}: transformers.trainer_utils.PREFIX_CHECKPOINT_DIR (used by a fake entry): the "
        "value is 'checkpoint', lorakit relies on 'ckpt'"
    ]

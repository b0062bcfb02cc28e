"""Shared by the benchmark scripts: the synthetic data, the models, the machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULT_PREFIX = "BENCH_RESULT "

WORDS = (
    "the quick brown fox jumps over lazy dog what is capital of france paris route this ticket to billing "
    "shipping technical or account hello world how are you today i am fine thank below an instruction that "
    "describes a task write response appropriately completes request paired with input provides further "
    "context system user assistant"
).split()


def tokens_per_word(tokenizer: Any) -> float:
    """How many tokens this tokenizer spends on one of the bench's words."""
    text = " ".join(WORDS * 20)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / (len(WORDS) * 20)


def synthetic_rows(n: int, seed: int = 0, tokens_per_word: float = 1.0) -> list[dict[str, str]]:
    """Alpaca rows whose token lengths spread like chat data: log-normal prompt and reply lengths.

    Prompts ~ 35 tokens (median), replies ~ 90 (median), with long tails, about 40-1000 tokens with the
    template; word counts are divided by the tokenizer's ``tokens_per_word`` so every model sees the same
    distribution in tokens.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt_tokens = min(max(rng.lognormvariate(3.55, 0.9), 4), 350)
        reply_tokens = min(max(rng.lognormvariate(4.5, 0.85), 3), 550)
        rows.append(
            {
                "instruction": " ".join(
                    rng.choice(WORDS) for _ in range(max(1, int(prompt_tokens / tokens_per_word)))
                ),
                "input": "",
                "output": " ".join(
                    rng.choice(WORDS) for _ in range(max(1, int(reply_tokens / tokens_per_word)))
                ),
            }
        )
    return rows


def bench_rows(n: int, path: str, seed: int = 1) -> list[dict[str, str]]:
    """``n`` synthetic rows sized for the tokenizer of the model at ``path``."""
    from transformers import AutoTokenizer

    return synthetic_rows(n, seed, tokens_per_word(AutoTokenizer.from_pretrained(path)))


def tiny_model_dir(root: Path) -> str:
    """The test suite's tiny Llama (2 layers, hidden 64) and tokenizer, written under ``root``."""
    path = root / "tiny-llama"
    if (path / "config.json").is_file():
        return str(path)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny_model

    return build_tiny_model(path, max_position_embeddings=1024)


def smollm2_dir() -> str:
    from lorakit.config import ModelSpec
    from lorakit.models import resolve_model_path

    return resolve_model_path(ModelSpec("smollm2-135m"))


def model_dir(name: str, scratch: Path) -> str:
    return tiny_model_dir(scratch) if name == "tiny" else smollm2_dir()


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average shows how shared the machine was)."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    from lorakit.models import cpu_has_native_bf16

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15": [round(x, 2) for x in load],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def matmul_peak(size: int = 2048, repeats: int = 8) -> dict[str, float]:
    """Best GFLOP/s of a ``size x size`` matmul in fp32 and bf16 (the machine's practical peak)."""
    import torch

    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        peak[name] = round(2 * size**3 / best / 1e9, 1)
    return peak


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process; its last ``BENCH_RESULT`` line is the result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAKIT_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"worker {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    return path

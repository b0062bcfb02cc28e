"""Start-up and inference speed: ``import lorakit``, ``lorakit --help``, and generation with an adapter.

    PYTHONPATH=$PWD python bench/startup_inference.py            # writes bench/results/startup_inference-*.json

- ``import lorakit`` (in-process seconds) and ``lorakit --help`` (wall clock of the console script), each the
  median of 9 fresh processes, next to a bare ``python -c pass``;
- SmolLM2-135M generating 32 new tokens (``min_new_tokens`` = ``max_new_tokens``, greedy) for one prompt: the
  base model, the base + an r=16 all-linear LoRA adapter (unmerged) and the merged model, interleaved, 5 rounds;
- 16 prompts as one batch vs a loop of 16 single calls (merged model), alternating, 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, smollm2_dir, write_result  # noqa: E402

NEW_TOKENS = 32
PROMPTS = [
    f"Summarize in one sentence: ticket {i} says the parcel was late and the customer was charged twice."
    for i in range(16)
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _wall(command: list[str], runs: int = 9) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=_env(), check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def startup() -> dict[str, Any]:
    code = "import time; t = time.perf_counter(); import lorakit; print(time.perf_counter() - t)"
    in_process = []
    for _ in range(9):
        out = subprocess.run(
            [sys.executable, "-c", code], env=_env(), check=True, capture_output=True, text=True
        )
        in_process.append(float(out.stdout.strip()))
    script = shutil.which("lorakit")
    cli = _wall([script, "--help"]) if script else _wall([sys.executable, "-m", "lorakit.cli", "--help"])
    bare = _wall([sys.executable, "-c", "pass"])
    torch_import = _wall([sys.executable, "-c", "import torch"], runs=3)
    return {
        "import_lorakit_s_median": round(statistics.median(in_process), 4),
        "import_lorakit_s_all": [round(t, 4) for t in in_process],
        "lorakit_help_wall_s_median": round(statistics.median(cli), 4),
        "lorakit_help_wall_s_all": [round(t, 4) for t in cli],
        "python_pass_wall_s_median": round(statistics.median(bare), 4),
        "import_torch_wall_s_median": round(statistics.median(torch_import), 3),
        "targets": {"import_lorakit_s": 0.3, "lorakit_help_s": 0.5},
    }


def _adapter(base_dir: str, out: Path) -> Path:
    """An r=16 all-linear LoRA adapter with non-zero B (random), saved in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    model.save_pretrained(out)
    return out


def _time(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def generation(rounds: int = 5, batch_rounds: int = 2) -> dict[str, Any]:
    import lorakit as lk

    base_dir = smollm2_dir()
    adapter_dir = _adapter(base_dir, Path(tempfile.mkdtemp(prefix="bench-adapter-")))
    models = {
        "base": lk.InferenceModel.from_model(base_dir, template="alpaca"),
        "unmerged": lk.InferenceModel.load(adapter_dir, template="alpaca"),
    }
    models["merged"] = models["unmerged"].merge()
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    for model in models.values():  # warm-up
        model.generate(PROMPTS[0], **options)
    latency: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            latency[name].append(_time(lambda m=models[name]: m.generate(PROMPTS[0], **options)))
    median = {name: statistics.median(times) for name, times in latency.items()}
    merged = models["merged"]
    batched, looped = [], []
    for r in range(batch_rounds):
        pair = [
            ("batched", lambda: merged.generate(PROMPTS, **options)),
            ("looped", lambda: [merged.generate(p, **options) for p in PROMPTS]),
        ]
        for name, fn in pair if r % 2 == 0 else reversed(pair):
            (batched if name == "batched" else looped).append(_time(fn))
    return {
        "model": "smollm2-135m",
        "new_tokens": NEW_TOKENS,
        "latency_s_median": {k: round(v, 4) for k, v in median.items()},
        "latency_s_all": {k: [round(t, 4) for t in v] for k, v in latency.items()},
        "merged_over_base": round(median["merged"] / median["base"], 3),
        "unmerged_over_base": round(median["unmerged"] / median["base"], 3),
        "batch16_s_all": [round(t, 3) for t in batched],
        "loop16_s_all": [round(t, 3) for t in looped],
        "loop16_over_batch16": round(statistics.median(looped) / statistics.median(batched), 2),
        "targets": {"merged_over_base": 1.02, "unmerged_over_base": 1.25, "loop16_over_batch16": 5.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    payload: dict[str, Any] = {"machine": machine(), "startup": startup()}
    print(f"startup: {payload['startup']}", flush=True)
    if not args.skip_generation:
        payload["generation"] = generation()
        print(f"generation: {payload['generation']}", flush=True)
    payload["machine_after"] = machine()
    print(f"wrote {write_result('startup_inference', payload)}")


if __name__ == "__main__":
    main()

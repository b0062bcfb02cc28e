"""Peak RSS of ``lorakit.evaluate`` for two evaluation-set sizes: memory must stay flat as the set grows.

Each size runs in its own process (peak RSS is per process). The process loads the model, records its RSS
(the baseline: weights, tokenizer, libraries), then evaluates perplexity (teacher-forced) and ROUGE / exact
match (greedy generation) on N rows in batches, and records its peak RSS. The growth from the baseline is
what the evaluation itself costs; it should not depend on N. For comparison, the script also prints how much
memory keeping every row's logits (what ``Trainer.evaluate`` with a ``compute_metrics`` does) would take.

    PYTHONPATH=$PWD python bench/eval_memory.py                       # smollm2-135m, 32 and 256 rows
    PYTHONPATH=$PWD python bench/eval_memory.py --sizes 16 64 --model path/to/model

Writes bench/results/eval_memory.json. Timings are not the point here (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(model: str, size: int, batch_size: int, max_new_tokens: int) -> dict:
    import lorakit as lk
    from lorakit.quickstart import _read_jsonl, sample_path

    base = _read_jsonl(sample_path("test"))
    rows = [base[i % len(base)] for i in range(size)]
    loaded = lk.InferenceModel.from_model(model, template="alpaca")
    # Warm up (first forward / generate allocate their workspaces), so the baseline includes them.
    lk.evaluate(loaded, rows[:batch_size], metrics=["perplexity"], batch_size=batch_size)
    baseline = _rss_mb()
    peak_before = _peak_mb()
    started = time.perf_counter()
    result = lk.evaluate(
        loaded,
        rows,
        metrics=["perplexity", "rouge", "exact_match"],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    seconds = time.perf_counter() - started
    peak = _peak_mb()
    tokens = [len(loaded.encode({k: r[k] for k in ("instruction", "input")})) for r in rows]
    vocab = loaded.model.config.vocab_size
    all_logits_mb = (
        sum(tokens) * vocab * 4 / 2**20
    )  # fp32 logits of every prompt token, kept for the whole set
    return {
        "rows": size,
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(max(peak, peak_before), 1),
        "eval_growth_mb": round(max(peak, peak_before) - baseline, 1),
        "seconds": round(seconds, 1),
        "metrics": {k: round(v, 4) for k, v in result.metrics.items()},
        "if_all_logits_were_kept_mb": round(all_logits_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(HERE / "results" / "eval_memory.json"))
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.batch_size, args.max_new_tokens)))
        return
    runs = []
    for size in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--child",
            str(size),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    small, large = runs[0], runs[-1]
    summary = {
        "benchmark": "peak RSS of lorakit.evaluate vs evaluation-set size",
        "model": args.model,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
        "rows_ratio": large["rows"] / small["rows"],
        "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "eval_growth_difference_mb": round(large["eval_growth_mb"] - small["eval_growth_mb"], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs (timings inflated)",
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()

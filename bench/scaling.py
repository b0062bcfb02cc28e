"""How cost grows: packing and grouping at 1k/10k/100k rows, data preparation (cold and cached), and training
tokens/s at max length 128/512/1024 and at 1k vs 10k rows, with peak RSS against the plan's memory estimate.

    PYTHONPATH=$PWD python bench/scaling.py --parts packing,data          # seconds to minutes
    PYTHONPATH=$PWD python bench/scaling.py --parts train --model smollm2 --steps 4

Parts:

- ``packing``: rows/s of lorakit's packer (:func:`lorakit.data.prepare.first_fit_bins`, a max-tree, O(n log n))
  against the scan over open bins it replaced (O(n x bins); skipped above ``--scan-max`` rows, where it takes
  minutes), and of :func:`lorakit.batching.grouped_indices`, on lengths drawn like the bench rows
  (log-normal, cut at the max length);
- ``data``: :func:`lorakit.data.prepare_data` rows/s on the bench rows with the model's tokenizer, cold and again
  from the cache (the cache hit and its speed-up);
- ``train``: lorakit's default training (fresh process per setting), ``--steps`` steps at batch 4: tokens/s at
  max length 128/512/1024 (1k rows) and at 1k vs 10k rows (512), each with the process's peak RSS and
  ``Pipeline.plan()``'s memory total: the ratio of the peak RSS to the estimate (RSS also holds Python, torch
  and the data) and of the training's own part (peak RSS minus the RSS just before ``train()``) to it.

Results: ``bench/results/scaling-*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_rows, emit, machine, model_dir, peak_rss_mb, run_worker, write_result  # noqa: E402


def bench_lengths(n: int, max_length: int, seed: int = 0) -> list[int]:
    """Token lengths spread like the bench rows (prompt ~35, reply ~90 tokens median, with the template)."""
    rng = random.Random(seed)
    return [
        min(max_length, 20 + int(rng.lognormvariate(3.55, 0.9)) + int(rng.lognormvariate(4.5, 0.85)))
        for _ in range(n)
    ]


def scan_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """The packer lorakit had before issue 16: first-fit decreasing by scanning every open bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def packing_part(sizes: list[int], scan_max: int, max_length: int = 512) -> dict[str, Any]:
    from lorakit.batching import grouped_indices
    from lorakit.data.prepare import first_fit_bins

    out = {}
    for n in sizes:
        lengths = bench_lengths(n, max_length)
        bins, tree_s = timed(lambda lengths=lengths: first_fit_bins(lengths, max_length))
        _, group_s = timed(lambda lengths=lengths: grouped_indices(lengths, 4, seed=0))
        row: dict[str, Any] = {
            "tree_rows_per_s": round(n / tree_s),
            "grouping_rows_per_s": round(n / group_s),
            "bins": len(bins),
        }
        if n <= scan_max:
            scanned, scan_s = timed(lambda lengths=lengths: scan_first_fit(lengths, max_length))
            assert scanned == bins, "the max-tree and the scan must pack identically"
            row.update(scan_rows_per_s=round(n / scan_s), speedup=round(scan_s / tree_s, 1))
        out[str(n)] = row
        print(f"packing {n:>7} rows: {row}", flush=True)
    return out


def data_part(model_name: str, sizes: list[int]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lorakit.data import prepare_data

    scratch = Path(tempfile.gettempdir()) / "lorakit-bench"
    scratch.mkdir(exist_ok=True)
    path = model_dir(model_name, scratch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = {}
    for n in sizes:
        rows = bench_rows(n, path)
        cache = Path(tempfile.mkdtemp(prefix="scaling-cache-"))

        def prepare(rows: list[dict[str, str]] = rows, cache: Path = cache) -> Any:
            return prepare_data(
                rows, tokenizer=tokenizer, template="alpaca", val_split=0, max_length=512, cache=cache
            )

        cold, cold_s = timed(prepare)
        warm, warm_s = timed(prepare)
        row = {
            "cold_rows_per_s": round(n / cold_s),
            "cached_rows_per_s": round(n / warm_s),
            "cache_speedup": round(cold_s / warm_s, 1),
            "cache_hit": warm.report.cache_hit,
            "cold_cache_hit": cold.report.cache_hit,
            "same_rows": warm.train["input_ids"] == cold.train["input_ids"],
        }
        out[str(n)] = row
        print(f"data {n:>6} rows: {row}", flush=True)
    return out


def train_worker(
    model_name: str, rows_n: int, max_length: int, steps: int, precision: str = "auto"
) -> dict[str, Any]:
    import lorakit as lk

    scratch = Path(tempfile.gettempdir()) / "lorakit-bench"
    scratch.mkdir(exist_ok=True)
    path = model_dir(model_name, scratch)
    pipeline = (
        lk.Pipeline.from_model(path)
        .with_lora(r=16, alpha=32, targets="all-linear")
        .with_dataset(
            bench_rows(rows_n, path), template="alpaca", val_split=0, max_length=max_length, cache=False
        )
        .with_training(
            max_steps=steps, batch_size=4, warmup_ratio=0.0, logging_steps=1, seed=0, precision=precision
        )
    )
    estimate = pipeline.plan().memory
    baseline = current_rss_mb()  # Python, torch, transformers and the rows: what the plan does not count
    started = time.perf_counter()
    result = pipeline.train(Path(tempfile.mkdtemp(prefix="scaling-")) / "run")
    metrics = result.metrics
    rss = peak_rss_mb()
    return {
        "rows": rows_n,
        "max_length": max_length,
        "tokens_per_s": round(metrics["train_tokens"] / metrics["train_runtime"], 1),
        "train_runtime_s": round(metrics["train_runtime"], 2),
        "wall_s_with_prep_and_load": round(time.perf_counter() - started, 2),
        "peak_rss_mb": rss,
        "plan_estimate_mb": round(estimate.total / 2**20, 1) if estimate else None,
        "rss_over_estimate": round(rss / (estimate.total / 2**20), 2) if estimate else None,
        "rss_before_train_mb": baseline,
        "training_rss_mb": round(rss - baseline, 1),
        "training_rss_over_estimate": round((rss - baseline) / (estimate.total / 2**20), 2)
        if estimate
        else None,
        # against the plan's resident bound (the estimate times the CPU allocator factor): at most 1
        "training_rss_over_resident": round((rss - baseline) / (estimate.resident / 2**20), 2)
        if estimate
        else None,
        "precision": json.loads((result.output_dir / "lorakit_run.json").read_text())["precision"],
    }


def current_rss_mb() -> float:
    """The process's resident set now (``VmRSS``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def train_part(model_name: str, steps: int, precision: str) -> list[dict[str, Any]]:
    out = []
    for rows_n, max_length in ((1000, 128), (1000, 512), (1000, 1024), (10000, 512)):
        result = run_worker(
            Path(__file__).resolve(),
            ["train", model_name, str(rows_n), str(max_length), str(steps), precision],
        )
        out.append(result)
        print(f"train {result}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="packing,data,train")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--scan-max", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--precisions", default="auto", help="e.g. auto,fp32: the train part once per precision"
    )
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _, model_name, rows_n, max_length, steps, precision = args.worker
        emit(train_worker(model_name, int(rows_n), int(max_length), int(steps), precision))
        return
    os.environ.setdefault("LORAKIT_PROGRESS", "0")
    sizes = [int(s) for s in args.sizes.split(",")]
    parts = args.parts.split(",")
    payload: dict[str, Any] = {"machine": machine()}
    if "packing" in parts:
        payload["packing"] = packing_part(sizes, args.scan_max)
    if "data" in parts:
        payload["data"] = data_part(args.model, [s for s in sizes if s <= 10000])
    if "train" in parts:
        payload["train"] = [
            row
            for precision in args.precisions.split(",")
            for row in train_part(args.model, args.steps, precision)
        ]
    payload["machine_after"] = machine()
    print(f"wrote {write_result('scaling', payload)}")


if __name__ == "__main__":
    main()

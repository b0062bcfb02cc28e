"""Each speed path of the training step alone against the same baseline, interleaved, in fresh processes.

    PYTHONPATH=$PWD python bench/speed_paths.py --model tiny --repeats 3
    PYTHONPATH=$PWD python bench/speed_paths.py --model smollm2 --steps 6 --variants base,fused_loss,compile

Variants (lorakit's pipeline, LoRA r=16 all-linear, the bench rows; each changes one thing against ``base``):

- ``base``: fused_loss=False (TRL's loss), optim="adamw_torch" (the defaults before issue 16), dropout 0.05,
  compile=False, fp32;
- ``fused_loss``: lorakit's fused linear cross-entropy (:mod:`lorakit.fused`);
- ``optim_fused`` / ``optim_foreach``: ``adamw_torch_fused`` / AdamW with ``foreach=True``;
- ``dropout0``: LoRA dropout 0 (PEFT then uses ``nn.Identity``);
- ``compile``: ``torch.compile`` of the decoder layers;
- ``bf16``: bf16 autocast over fp32 weights;
- ``defaults``: lorakit's defaults since issue 16: fused_loss + optim_fused + ``precision="auto"`` (bf16
  autocast on a CPU with native bf16 for models of hidden size >= 256);
- ``all``: the defaults + compile (the compile decision: does it win over the defaults, compile time included?).

Per run: the time of the first step (compile time shows here), the median of the later steps, the wall time of
``train()`` and the final loss. Ratios are base / variant per repeat (same round), then the median: the machine
may be shared, so only ratios within a round mean anything. Results: ``bench/results/speed_paths-*.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_rows, emit, machine, model_dir, run_worker, write_result  # noqa: E402

VARIANTS = (
    "base",
    "fused_loss",
    "optim_fused",
    "optim_foreach",
    "dropout0",
    "compile",
    "bf16",
    "defaults",
    "all",
)


def step_clock() -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.started)

    return Clock()


def worker(model_name: str, variant: str, steps: int, batch_size: int, max_length: int) -> dict[str, Any]:
    import torch

    import lorakit as lk

    scratch = Path(tempfile.gettempdir()) / "lorakit-bench"
    scratch.mkdir(exist_ok=True)
    path = model_dir(model_name, scratch)
    rows = bench_rows(steps * batch_size, path)
    defaults = {"fused_loss", "optim_fused", "auto"}  # lorakit's defaults since issue 16
    on = {"defaults": defaults, "all": defaults | {"compile"}}.get(variant, {variant})
    if variant == "optim_foreach":
        torch.optim.AdamW.__init__.__kwdefaults__["foreach"] = True  # the bench only: AdamW(foreach=True)
    pipeline = (
        lk.Pipeline.from_model(path)
        .with_lora(r=16, alpha=32, dropout=0.0 if "dropout0" in on else 0.05, targets="all-linear")
        .with_dataset(rows, template="alpaca", val_split=0, max_length=max_length, cache=False)
        .with_training(
            max_steps=steps,
            batch_size=batch_size,
            lr=2e-4,
            warmup_ratio=0.0,
            logging_steps=1,
            seed=0,
            precision="bf16" if "bf16" in on else "auto" if "auto" in on else "fp32",
            fused_loss="fused_loss" in on,
            optim="adamw_torch_fused" if "optim_fused" in on else "adamw_torch",
            compile="compile" in on,
        )
    )
    clock = step_clock()
    started = time.perf_counter()
    result = pipeline.train(Path(tempfile.mkdtemp(prefix=f"speed-{variant}-")) / "run", callbacks=[clock])
    later = clock.times[1:] or clock.times
    return {
        "variant": variant,
        "first_step_s": round(clock.times[0], 3),
        "step_s_median": round(statistics.median(later), 4),
        "train_s": round(time.perf_counter() - started, 2),
        "tokens": result.metrics["train_tokens"],
        "train_loss": result.metrics["train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        model_name, variant = args.worker
        emit(worker(model_name, variant, args.steps, args.batch_size, args.max_length))
        return
    variants = ["base", *[v for v in args.variants.split(",") if v != "base"]]
    shape = [
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
    ]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    payload: dict[str, Any] = {"machine": machine(), "settings": vars(args), "runs": runs}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else list(reversed(variants)):
            result = run_worker(Path(__file__).resolve(), [*shape, "--worker", args.model, variant])
            runs[variant].append(result)
            print(f"r{repeat} {variant:14s} {result}", flush=True)
    ratios = {}
    for variant in variants[1:]:
        pairs = list(zip(runs["base"], runs[variant], strict=True))
        ratios[variant] = {
            "steady_step_speedup": round(
                statistics.median(b["step_s_median"] / v["step_s_median"] for b, v in pairs), 3
            ),
            "first_step_s_extra": round(
                statistics.median(v["first_step_s"] - b["first_step_s"] for b, v in pairs), 2
            ),
            "train_wall_speedup": round(statistics.median(b["train_s"] / v["train_s"] for b, v in pairs), 3),
            "loss_diff": round(
                statistics.median(abs(b["train_loss"] - v["train_loss"]) for b, v in pairs), 6
            ),
        }
        print(f"{variant:14s} {ratios[variant]}", flush=True)
    payload["ratios"] = ratios
    payload["machine_after"] = machine()
    print(f"wrote {write_result(f'speed_paths-{args.model}', payload)}")


if __name__ == "__main__":
    main()

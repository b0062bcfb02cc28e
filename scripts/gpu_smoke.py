"""The GPU smoke test: one command on any CUDA machine or Colab runtime, a table of what ran and how fast.

    python scripts/gpu_smoke.py                 # Qwen2.5-0.5B-Instruct, ~5 minutes on a T4
    python scripts/gpu_smoke.py --model Qwen/Qwen2.5-1.5B-Instruct --steps 30 --out /tmp/smoke

It trains QLoRA (4-bit base) and LoRA (16-bit base) for a few steps on the bundled ticket data, evaluates the
LoRA run, generates (single, batched, streamed, chat), merges with verification and reloads the merged model,
and tries the fast-path switches (SDPA / flash-attention 2, Liger kernels, padding-free packing, paged 8-bit
AdamW). Each row of the table says what ran, whether it passed, and its time and speed; a step that fails is
reported and the script goes on. Exit status: 0 when everything that ran passed, 1 otherwise, 2 without a GPU.

Needs the Hub (to download the model) and ``pip install 'lorakit[qlora]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ROWS: list[dict[str, Any]] = []
"""Results: one dict per step (name, status, seconds, speed, note)."""


def step(name: str, action: Callable[[], str | None]) -> Any:
    """Run one step, time it and record its row; a failure is recorded (with its error) and not raised."""
    started = time.perf_counter()
    try:
        note = action() or ""
        status = "ok"
    except Exception as error:  # a smoke test reports every failing step and goes on to the next one
        note = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"
        status = "FAILED"
        traceback.print_exc()
    ROWS.append({"step": name, "status": status, "seconds": time.perf_counter() - started, "note": note})
    print(f"[{status}] {name}: {note}", flush=True)


def require_gpu(cpu_dry_run: bool) -> Any:
    """The :class:`lorakit.models.DeviceInfo` of GPU 0, or exit 2 with a clear message on a CPU-only machine
    (``--cpu-dry-run`` checks the script itself on the CPU instead; that is not a GPU test)."""
    import torch

    if not torch.cuda.is_available() and not cpu_dry_run:
        print(
            "gpu_smoke.py needs a CUDA GPU and none is available (torch.cuda.is_available() is False).\n"
            "On Colab: Runtime > Change runtime type > T4 GPU, then run it again. The CPU path is covered by the "
            "test suite (pytest).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from lorakit.models import current_device

    return current_device()


def train_speed(result: Any) -> str:
    """``"12.3 s, 850 tokens/s, loss 2.10"`` from a TrainResult's metrics."""
    metrics = result.metrics
    parts = [f"loss {metrics.get('train_loss', float('nan')):.3f}"]
    if "train_tokens_per_second" in metrics:
        parts.append(f"{metrics['train_tokens_per_second']:.0f} tokens/s")
    return ", ".join(parts)


def pipeline(args: argparse.Namespace, **training: Any) -> Any:
    import lorakit as lk
    from lorakit.quickstart import sample_path

    return (
        lk.Pipeline.from_model(args.model, attention=training.pop("attention", "auto"))
        .with_lora(r=16, alpha=32, targets="all-linear")
        .with_dataset(
            str(sample_path("train")), val_split=0.1, max_length=256, packing=training.pop("packing", False)
        )
        .with_training(max_steps=args.steps, batch_size=4, lr=2e-4, logging_steps=1, **training)
    )


def run_training_steps(args: argparse.Namespace, out: Path) -> None:
    """QLoRA and LoRA runs, each explained first (device, precision, fast paths)."""
    qlora = pipeline(args, optim="auto").quantize_4bit()
    print(qlora.explain(), flush=True)
    step(
        "QLoRA train (4-bit, optim=auto)",
        lambda: train_speed(qlora.train(out / "qlora", overwrite=True)),
    )
    lora = pipeline(args)
    print(lora.explain(), flush=True)
    step("LoRA train (16-bit on a GPU)", lambda: train_speed(lora.train(out / "lora", overwrite=True)))


def run_inference_steps(args: argparse.Namespace, out: Path) -> None:
    import lorakit as lk
    from lorakit.quickstart import sample_path

    test_rows = [json.loads(line) for line in sample_path("test").read_text().splitlines()][:16]
    holder: dict[str, Any] = {}

    def evaluate() -> str:
        report = lk.evaluate(
            str(out / "lora"), test_rows, metrics=["perplexity", "exact_match"], max_new_tokens=8
        )
        return ", ".join(f"{k} {v:.3f}" for k, v in report.metrics.items())

    def load() -> str:
        holder["model"] = model = lk.InferenceModel.load(out / "lora")
        return f"on {model.device}, {next(model.model.parameters()).dtype}"

    def generate() -> str:
        model = holder["model"]
        started = time.perf_counter()
        texts = model.generate([row["input"] for row in test_rows[:8]], max_new_tokens=32)
        single = model.generate(test_rows[0]["input"], max_new_tokens=32)
        streamed = "".join(model.stream(test_rows[0]["input"], max_new_tokens=32))
        chat = model.chat([{"role": "user", "content": test_rows[0]["input"]}], max_new_tokens=32)
        seconds = time.perf_counter() - started
        assert len(texts) == 8 and single.strip() == streamed.strip() and isinstance(chat, str)
        return f"batch of 8 + single + stream + chat in {seconds:.1f} s; streamed == single"

    def merge() -> str:
        merged = holder["model"].merge(verify=True)
        report = merged.merge_report
        assert report.logits_match, report.summary()
        path = merged.save(out / "merged")
        reloaded = lk.InferenceModel.load(path)
        assert reloaded.device == holder["model"].device
        return (
            f"max |logit diff| {report.max_logit_diff:.3g} <= {report.logit_tolerance:.3g} ({report.merged_dtype}); "
            "saved and reloaded"
        )

    step("evaluate (perplexity, exact match)", evaluate)
    step("load the LoRA run (GPU when there is one)", load)
    step("generate (batched, single, stream, chat)", generate)
    step("merge(verify=True), save, reload", merge)


def run_fast_path_steps(args: argparse.Namespace, out: Path, device: Any) -> None:
    """Each fast-path switch for a few steps; an unavailable one is reported as skipped, with the reason."""
    from importlib.util import find_spec

    few = max(2, args.steps // 3)
    switches = [
        ("sdpa attention", {"attention": "sdpa"}, None),
        (
            "flash_attention_2",
            {"attention": "flash_attention_2"},
            None
            if find_spec("flash_attn") and (device.capability or (0, 0)) >= (8, 0)
            else "needs flash-attn and compute capability 8.0+",
        ),
        ("padding-free packing", {"packing": True}, None),
        (
            "Liger kernels",
            {"liger": True},
            None if find_spec("liger_kernel") else "liger-kernel not installed",
        ),
    ]
    for name, options, skip in switches:
        if skip:
            ROWS.append({"step": f"fast path: {name}", "status": "skipped", "seconds": 0.0, "note": skip})
            continue
        fast = pipeline(argparse.Namespace(**{**vars(args), "steps": few}), **options)
        slug = name.split()[0].lower()
        step(
            f"fast path: {name}",
            lambda fast=fast, slug=slug: train_speed(fast.train(out / slug, overwrite=True)),
        )


def table(device: Any) -> str:
    lines = [f"lorakit GPU smoke test on {device.describe()}", ""]
    lines.append(f"{'step':44} {'status':8} {'seconds':>8}  note")
    for row in ROWS:
        lines.append(f"{row['step']:44} {row['status']:8} {row['seconds']:8.1f}  {row['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="a Hub id or local model directory"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run (default 20)")
    parser.add_argument("--out", default="runs/gpu-smoke", help="where the runs are written")
    parser.add_argument(
        "--skip-fast-paths", action="store_true", help="only the QLoRA / LoRA / inference steps"
    )
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="run the script on a CPU to check it (not a GPU test)"
    )
    args = parser.parse_args(argv)
    device = require_gpu(args.cpu_dry_run)
    out = Path(args.out)
    started = time.perf_counter()
    run_training_steps(args, out)
    run_inference_steps(args, out)
    if not args.skip_fast_paths:
        run_fast_path_steps(args, out, device)
    print("\n" + table(device) + f"\n\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    (out / "gpu_smoke.json").write_text(json.dumps({"device": device.describe(), "steps": ROWS}, indent=2))
    return 0 if all(row["status"] != "FAILED" for row in ROWS) else 1


if __name__ == "__main__":
    raise SystemExit(main())

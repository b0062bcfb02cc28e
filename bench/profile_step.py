"""Where a training step's time goes: the torch profiler over a few steps of one benchmark configuration.

    PYTHONPATH=$PWD python bench/profile_step.py --model smollm2 --config c_lorakit --steps 2

Prints the operators by self CPU time (the table goes to bench/results/profile-<config>-<model>.txt too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, bench_rows, model_dir  # noqa: E402
from bench.train_throughput import (  # noqa: E402
    SETTINGS,
    lorakit_pipeline,
    packed_batch_size,
    rendered,
    seeds_trainer,
    trl_trainer,
)


def profiler_callback(skip: int, steps: int) -> Any:
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        """Profile optimizer steps skip+1 .. skip+steps (the first step warms up allocations)."""

        def __init__(self) -> None:
            self.profiler: Any = None
            self.table = ""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == skip and self.profiler is None:
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.profiler is not None and not self.table and state.global_step >= skip + steps:
                self.profiler.__exit__(None, None, None)
                self.table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)

    return Profile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--config", default="c_lorakit")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    scratch = Path(tempfile.gettempdir()) / "lorakit-bench"
    scratch.mkdir(exist_ok=True)
    settings = SETTINGS[args.model]
    path = model_dir(args.model, scratch)
    rows = bench_rows(settings["rows"], path)
    batch_size = settings["batch_size"]
    callback = profiler_callback(1, args.steps)
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    if args.config.startswith("c_"):
        if args.config == "c_packed":
            batch_size = packed_batch_size(rows, path, batch_size)
        lorakit_pipeline(path, rows, batch_size, args.config).train(out / "run", callbacks=[callback])
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        pairs = rendered(rows, tokenizer)
        if args.config == "a_seeds":
            trainer = seeds_trainer(path, tokenizer, pairs, batch_size, out)
        else:
            trainer = trl_trainer(
                path, tokenizer, pairs, batch_size, out, gc=None if args.config == "b_trl" else False
            )
        trainer.add_callback(callback)
        trainer.train()
    print(callback.table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile-{args.config}-{args.model}.txt").write_text(callback.table + "\n")


if __name__ == "__main__":
    main()

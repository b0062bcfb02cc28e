#!/usr/bin/env python
"""DPO on SmolLM2-135M-Instruct with the bundled support-ticket preference set, measured on held-out pairs.

Trains a LoRA adapter with ``with_preference("dpo")`` on ``support_prefs_train.jsonl`` (240 pairs) and measures,
on the 90 held-out pairs of ``support_prefs_test.jsonl`` (tickets worded unlike the training ones):

- preference accuracy: the share of pairs where the model gives the chosen reply a higher log-probability than
  the rejected one (summed over the reply's tokens, as DPO scores them), before (the base) and after DPO;
- reward margin: DPO's implicit reward of chosen minus rejected, ``beta * ((log pi_c - log ref_c) -
  (log pi_r - log ref_r))``, averaged (0 before training: the policy is the reference), and reward accuracy
  (the share of pairs with a positive margin);
- TRL's own evaluation of the same held-out pairs (``eval_rewards/accuracies``, ``eval_rewards/margins``);
- the wall time of training and of each measurement.

Runs offline on CPU in a few minutes::

    python scripts/dpo_demo.py [--steps 60] [--out runs/dpo-demo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lorakit as lk
from lorakit.data.preference import preference_sample_path, prepare_preference_data
from lorakit.embedded import embedded_model_dir

BETA = 0.1
MAX_LENGTH = 256


def completion_logps(model: Any, rows: list[dict[str, list[int]]], side: str) -> list[float]:
    """Summed log-probability of each row's ``side`` completion given its prompt."""
    import torch

    out = []
    with torch.no_grad():
        for row in rows:
            prompt, completion = row["prompt_ids"], row[side]
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])
            out.append(float(logps.sum()))
    return out


def measure(model: Any, rows: list[dict[str, list[int]]]) -> dict[str, list[float]]:
    model.eval()
    return {side: completion_logps(model, rows, side) for side in ("chosen_ids", "rejected_ids")}


def summary(policy: dict[str, list[float]], ref: dict[str, list[float]]) -> dict[str, float]:
    chosen, rejected = policy["chosen_ids"], policy["rejected_ids"]
    margins = [
        BETA * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(chosen, rejected, ref["chosen_ids"], ref["rejected_ids"], strict=True)
    ]
    n = len(chosen)
    return {
        "preference_accuracy": round(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n, 4),
        "reward_margin": round(sum(margins) / n, 4),
        "reward_accuracy": round(sum(m > 0 for m in margins) / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/dpo-demo")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=None, help="held-out pairs measured (default: all 90)")
    parser.add_argument(
        "--trl-eval", action="store_true", help="also run TRL's evaluation on the held-out pairs"
    )
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base_dir = embedded_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    test = prepare_preference_data(
        preference_sample_path("test"),
        tokenizer=tokenizer,
        template="chatml",
        paired=True,
        max_length=MAX_LENGTH,
        val_split=0.0,
    ).train.to_list()[: args.pairs]

    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = measure(base, test)
    measure_s = time.perf_counter() - started

    pipeline = (
        lk.Pipeline.from_model("smollm2-135m")
        .with_lora(r=16, alpha=32)
        .with_dataset(
            str(preference_sample_path("train")),
            template="chatml",
            val=str(preference_sample_path("test")) if args.trl_eval else None,
            val_split=0.0,
            max_length=MAX_LENGTH,
        )
        .with_preference("dpo", beta=BETA)
        .with_training(
            max_steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            logging_steps=4,
            eval_steps=10_000,
            warmup_ratio=0.1,
        )
    )
    print(pipeline.explain(), flush=True)
    started = time.perf_counter()
    result = pipeline.train(args.out, overwrite=True)
    train_s = time.perf_counter() - started

    after = measure(PeftModel.from_pretrained(base, args.out), test)
    report = {
        "model": "smollm2-135m",
        "train_pairs": 240,
        "held_out_pairs": len(test),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "beta": BETA,
        "before": summary(before, before),
        "after": summary(after, before),
        "trl_eval": {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("eval_rewards/")},
        "train_seconds": round(train_s, 1),
        "train_runtime_seconds": result.metrics["train_runtime"],
        "measure_seconds_per_model": round(measure_s, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    Path(args.out, "dpo_demo.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""DPO on SmolLM2-135M-Instruct with the bundled support-ticket preference set, measured on held-out pairs.

Trains a LoRA adapter with ``with_preference("dpo")`` on ``support_prefs_train.jsonl`` (240 pairs) and measures,
on the 90 held-out pairs of ``support_prefs_test.jsonl`` (tickets worded unlike the training ones):

- preference accuracy: the share of pairs where the model gives the chosen reply a higher log-probability than
  the rejected one (summed over the reply's tokens, as DPO scores them), before (the base) and after DPO; and
  per token (the mean log-probability of the reply's tokens), since two thirds of the rejected replies are
  curt one-liners that a summed log-probability favours for their length alone;
- reward margin: DPO's implicit reward of chosen minus rejected, ``beta * ((log pi_c - log ref_c) -
  (log pi_r - log ref_r))``, averaged (0 before training: the policy is the reference), and reward accuracy
  (the share of pairs with a positive margin);
- the same numbers by kind of rejected reply: ``polite_wrong_queue`` (the chosen reply's form with the wrong
  queue: a routing test of equal length) and ``curt`` (the right or a wrong queue, rudely: shorter);
- TRL's own evaluation of the same held-out pairs (``eval_rewards/accuracies``, ``eval_rewards/margins``);
- the wall time of training and of each measurement.

Runs offline on CPU in a few minutes::

    python scripts/dpo_demo.py [--steps 60] [--out runs/dpo-demo]
    python scripts/dpo_demo.py --adapter runs/dpo-demo     # measure a trained run again, no training
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from make_preference_data import POLITE, QUEUES  # scripts/ is on sys.path when this script runs

import lorakit as lk
from lorakit.data.preference import preference_sample_path, prepare_preference_data
from lorakit.embedded import embedded_model_dir

_POLITE = {template.format(queue=queue) for template in POLITE for queue in QUEUES}

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


def summary(
    policy: dict[str, list[float]], ref: dict[str, list[float]], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The numbers of all pairs, and of each kind of rejected reply."""
    kinds: dict[str, list[int]] = {"polite_wrong_queue": [], "curt": []}
    for index, row in enumerate(rows):
        kinds["polite_wrong_queue" if row["rejected_text"] in _POLITE else "curt"].append(index)
    report = _numbers(policy, ref, rows, range(len(rows)))
    report["by_kind"] = {kind: _numbers(policy, ref, rows, index) for kind, index in kinds.items()}
    return report


def _numbers(
    policy: dict[str, list[float]], ref: dict[str, list[float]], rows: list[dict[str, Any]], index: Any
) -> dict[str, float]:
    index = list(index)
    pc, pr = policy["chosen_ids"], policy["rejected_ids"]
    rc, rr = ref["chosen_ids"], ref["rejected_ids"]
    margins = [BETA * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in index]
    per_token = [pc[i] / len(rows[i]["chosen_ids"]) > pr[i] / len(rows[i]["rejected_ids"]) for i in index]
    n = len(index)
    return {
        "pairs": n,
        "preference_accuracy": round(sum(pc[i] > pr[i] for i in index) / n, 4),
        "per_token_accuracy": round(sum(per_token) / n, 4),
        "reward_margin": round(sum(margins) / n, 4),
        "reward_accuracy": round(sum(m > 0 for m in margins) / n, 4),
    }


def train(args: argparse.Namespace) -> Any:
    """DPO on the 240 bundled training pairs (the held-out pairs only with ``--trl-eval``)."""
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
    return pipeline.train(args.out, overwrite=True)


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
    parser.add_argument("--adapter", default=None, help="measure this trained run's adapter; no training")
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
    texts = [json.loads(line) for line in preference_sample_path("test").read_text().splitlines()]
    for row, text in zip(test, texts, strict=False):  # val_split=0.0 keeps the file's order
        row["rejected_text"] = text["rejected"]

    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = measure(base, test)
    measure_s = time.perf_counter() - started

    result = train(args) if args.adapter is None else None
    out = args.out if result is not None else args.adapter
    train_s = result.metrics["train_runtime"] if result is not None else None
    after = measure(PeftModel.from_pretrained(base, out), test)
    report = {
        "model": "smollm2-135m",
        "train_pairs": 240,
        "held_out_pairs": len(test),
        "adapter": str(out),
        "steps": args.steps if result is not None else None,
        "batch_size": args.batch_size if result is not None else None,
        "lr": args.lr if result is not None else None,
        "beta": BETA,
        "before": summary(before, before, test),
        "after": summary(after, before, test),
        "trl_eval": {
            k: round(v, 4)
            for k, v in (result.metrics if result else {}).items()
            if k.startswith("eval_rewards/")
        },
        "train_runtime_seconds": train_s,
        "measure_seconds_per_model": round(measure_s, 1),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    Path(out, "dpo_demo.json" if result is not None else "dpo_demo_measured.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

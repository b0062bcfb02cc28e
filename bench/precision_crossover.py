"""Where bf16 autocast starts to pay off on a CPU with native bf16: one LoRA training step, fp32 vs bf16
autocast, for Llama shapes of growing hidden size, interleaved in one process.

    PYTHONPATH=$PWD python bench/precision_crossover.py
    PYTHONPATH=$PWD python bench/precision_crossover.py --hidden 64,256,576 --repeats 7

Each shape: ``--layers`` decoder layers, intermediate = 8/3 x hidden (rounded to 64), heads of 64, a 49,152-token
vocabulary (SmolLM2's), LoRA r=16 on every linear layer (PEFT), fused AdamW, a batch of 4 x 256 tokens.
A step = forward + backward + optimizer step; the median of ``--repeats`` steps after two warm-up steps of
each precision, the two precisions alternating step by step. The ratio fp32 / bf16 > 1 means bf16 is faster.
``lorakit.models.CPU_BF16_MIN_HIDDEN`` (the smallest hidden size for which ``precision="auto"`` picks bf16 on
such a CPU) is set from this table. Results: ``bench/results/precision_crossover-*.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, write_result  # noqa: E402


def build(hidden: int, layers: int, vocab: int) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=max(64, round(hidden * 8 / 3 / 64) * 64),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 192),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, optimizer


def step(model: Any, optimizer: Any, batch: Any, bf16: bool) -> float:
    import torch

    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(hidden: int, layers: int, vocab: int, repeats: int, tokens: int) -> dict[str, Any]:
    import torch

    model, optimizer = build(hidden, layers, vocab)
    batch = torch.randint(0, vocab, (4, tokens))
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for bf16 in (False, True):
            step(model, optimizer, batch, bf16)
    for _ in range(repeats):
        for bf16 in (False, True):
            times[bf16].append(step(model, optimizer, batch, bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    return {
        "hidden": hidden,
        "layers": layers,
        "fp32_s": round(fp32, 4),
        "bf16_s": round(bf16, 4),
        "bf16_speedup": round(fp32 / bf16, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="64,128,256,384,512,576,768")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    before = machine()
    if not before.get("native_bf16"):
        print("this CPU has no native bf16: precision='auto' keeps fp32 here, nothing to measure")
    rows = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        row = measure(hidden, args.layers, args.vocab, args.repeats, args.tokens)
        rows.append(row)
        print(
            f"hidden {row['hidden']:4d}: fp32 {row['fp32_s']:.3f} s/step, bf16 autocast {row['bf16_s']:.3f} s/step,"
            f" bf16 {row['bf16_speedup']:.2f}x",
            flush=True,
        )
    write_result("precision_crossover", {"machine": before, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

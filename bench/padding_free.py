"""Padded vs padding-free batches on this machine: seconds per forward + backward step of SmolLM2-135M.

The same length-grouped batches (``lorakit.batching.grouped_indices``, as ``train()`` draws them) of synthetic
chat-length rows (``bench.common.synthetic_rows``), collated by ``PadCollator`` (padded, attention mask) and by
``PaddingFreeCollator`` (one concatenated row, per-example ``position_ids``: with SDPA / eager transformers
builds a block-diagonal mask over the whole row). Weights are frozen and the backward pass goes through the
activations (as with an adapter), one thread. This is the measurement behind ``padding_free="auto"`` leaving it
off with SDPA / eager.

    python bench/padding_free.py --batches 6 --batch-size 8 --attention sdpa
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import smollm2_dir, synthetic_rows, tokens_per_word  # noqa: E402


def _step_seconds(model, batch) -> float:
    import torch

    embeds = model.get_input_embeddings()(batch.pop("input_ids")).detach().requires_grad_()
    started = time.perf_counter()
    loss = model(inputs_embeds=embeds, **batch).loss
    loss.backward()
    seconds = time.perf_counter() - started
    assert torch.isfinite(loss)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.batching import grouped_indices
    from lorakit.collate import PadCollator, PaddingFreeCollator
    from lorakit.data import prepare_data

    torch.set_num_threads(1)
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=args.attention, dtype=torch.float32
    )
    model.requires_grad_(False)
    model.train()
    rows = synthetic_rows(args.batches * args.batch_size * 4, tokens_per_word=tokens_per_word(tokenizer))
    train = prepare_data(
        rows, tokenizer=tokenizer, template="alpaca", val_split=0, max_length=1024, cache=False
    )
    examples = train.train.to_list()
    order = grouped_indices([len(e["input_ids"]) for e in examples], args.batch_size, seed=0)
    batches = [
        [examples[i] for i in order[k : k + args.batch_size]]
        for k in range(0, args.batches * args.batch_size, args.batch_size)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collators = {"padded": PadCollator(pad), "padding_free": PaddingFreeCollator(pad)}
    _step_seconds(model, collators["padded"](batches[-1]))  # warm-up
    seconds = {name: 0.0 for name in collators}
    for batch in batches:
        for name, collate in collators.items():
            collated = collate(batch)
            collated.pop("use_cache", None)
            seconds[name] += _step_seconds(model, collated)
    tokens = sum(len(e["input_ids"]) for batch in batches for e in batch)
    padded = sum(args.batch_size * max(len(e["input_ids"]) for e in batch) for batch in batches)
    print(
        json.dumps(
            {
                "attention": args.attention,
                "batches": args.batches,
                "batch_size": args.batch_size,
                "tokens": tokens,
                "padded_positions": padded,
                "seconds_per_step": {k: round(v / len(batches), 3) for k, v in seconds.items()},
                "padding_free_over_padded": round(seconds["padding_free"] / seconds["padded"], 3),
                "load_average": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()

"""Peak memory of reading a JSONL corpus through the streamed path against the in-memory path, by corpus size.

Each measurement runs in a fresh subprocess (peak RSS is per process): it encodes every row of a corpus of N
alpaca rows (~600 characters each) with the tiny test tokenizer, either through ``lorakit.data.stream``
(``datasets`` streaming, rows encoded 16 at a time and dropped) or through ``prepare_data`` (all rows in
memory), and prints the growth of the peak RSS over the process after imports.

    python bench/stream_memory.py                # N = 20,000 and 80,000
    python bench/stream_memory.py --rows 10000 40000 160000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(path: str, mode: str, rows: int) -> None:
    """Child process: encode every row of ``path`` and print the peak-RSS growth in MB as JSON."""
    import itertools

    import datasets

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_tokenizer

    from lorakit.config import DataSpec
    from lorakit.data import prepare_data
    from lorakit.data.stream import prepare_stream

    tokenizer = build_tiny_tokenizer()
    real = datasets.load_dataset
    datasets.load_dataset = lambda _id, _name=None, *, split=None, streaming=False: real(
        "json", data_files=path, split=split, streaming=True
    )
    spec = DataSpec(
        "org/corpus", streaming=True, template="alpaca", val_split=0.0, max_length=256, cache=False
    )
    before = _peak_mb()
    if mode == "stream":
        prepared = prepare_stream(
            spec.source,
            tokenizer=tokenizer,
            template="alpaca",
            val_rows=0,
            planned_rows=rows,
            probe_examples=4,
            **spec.prepare_kwargs(),
        )
        prepared.stream.start()
        examples = sum(1 for _ in itertools.islice(iter(prepared.train), rows))
    else:
        prepared = prepare_data(
            path, tokenizer=tokenizer, template="alpaca", val_split=0, max_length=256, cache=False
        )
        examples = len(prepared.train)
    print(
        json.dumps(
            {
                "mode": mode,
                "rows": rows,
                "examples": examples,
                "peak_growth_mb": round(_peak_mb() - before, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _measure(args.child[0], args.child[1], int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.rows:
            path = Path(folder) / f"corpus-{rows}.jsonl"
            with path.open("w") as out:
                for i in range(rows):
                    text = f"Question {i}: " + "some words of the question " * 20
                    out.write(json.dumps({"instruction": text, "output": f"Answer {i}. " * 10}) + "\n")
            for mode in ("stream", "memory"):
                done = subprocess.run(
                    [sys.executable, __file__, "--child", str(path), mode, str(rows)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                    env={
                        **os.environ,
                        "PYTHONPATH": str(ROOT),
                        "HF_DATASETS_OFFLINE": "1",
                        "HF_HUB_OFFLINE": "1",
                        "LORAKIT_PROGRESS": "0",
                        "OMP_NUM_THREADS": "1",
                    },
                )
                print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

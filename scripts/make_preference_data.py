#!/usr/bin/env python
"""Generate lorakit's bundled preference data: support tickets, polite correct routing vs curt or wrong.

Reads the bundled SFT sample (``scripts/make_sample_data.py`` writes it) and writes paired rows
(``prompt`` / ``chosen`` / ``rejected``) for DPO, ORPO and CPO:

    lorakit/samples/support_prefs_train.jsonl   240 rows, from the training tickets
    lorakit/samples/support_prefs_test.jsonl     90 rows, from the held-out tickets (other wording)

``chosen`` names the right queue politely in one sentence; ``rejected`` is one of: the same polite sentence
with a wrong queue, a curt answer with the right queue, or a curt answer with a wrong queue. KTO rows
(``prompt`` / ``completion`` / ``label``) are these pairs unpaired (lorakit does not need a separate file:
each pair gives one desirable and one undesirable completion; see docs/preference.md).

The script is seeded and deterministic:

    python scripts/make_preference_data.py            # (re)write the files
    python scripts/make_preference_data.py --check    # verify the committed files are up to date
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261204
TRAIN_ROWS = 240
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "lorakit" / "samples"
QUEUES = ("billing", "shipping", "technical", "account", "returns")

PROMPT = (
    "Route this support ticket to one queue (billing, shipping, technical, account or returns):\n\n{ticket}"
)

POLITE = (
    "Thank you for reaching out. This belongs with our {queue} team, and I have routed your ticket there.",
    "Thanks for contacting us! I've sent your ticket to the {queue} queue; they will help you shortly.",
    "I'm sorry for the trouble. Your ticket is now with the {queue} team, who handle exactly this.",
    "Thanks for the details. I've routed this to {queue}, the right team for your request.",
)
CURT = (
    "{queue}.",
    "Not my department. Try {queue}.",
    "{queue}, obviously.",
    "Whatever. {queue}.",
)


def _rows(source: Path, count: int | None, rng: random.Random) -> list[dict[str, str]]:
    tickets = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rng.shuffle(tickets)
    rows = []
    for index, ticket in enumerate(tickets[:count]):
        queue = ticket["output"]
        wrong = rng.choice([q for q in QUEUES if q != queue])
        chosen = rng.choice(POLITE).format(queue=queue)
        kind = index % 3  # an even mix of the three kinds of bad answer
        if kind == 0:
            rejected = rng.choice(POLITE).format(queue=wrong)
        else:
            rejected = rng.choice(CURT).format(queue=queue if kind == 1 else wrong)
            rejected = rejected[0].upper() + rejected[1:]
        rows.append({"prompt": PROMPT.format(ticket=ticket["input"]), "chosen": chosen, "rejected": rejected})
    return rows


def build() -> dict[Path, str]:
    """File path -> content of every generated file."""
    rng = random.Random(SEED)
    out = {}
    for split, count in (("train", TRAIN_ROWS), ("test", None)):
        rows = _rows(SAMPLES / f"support_tickets_{split}.jsonl", count, rng)
        out[SAMPLES / f"support_prefs_{split}.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ")
    args = parser.parse_args()
    stale = []
    for path, text in build().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10))} rows)")
    if stale:
        print("out of date: " + ", ".join(map(str, stale)) + "; run scripts/make_preference_data.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

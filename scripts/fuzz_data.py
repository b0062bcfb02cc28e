"""The long data-fuzzing profile: tests/test_fuzz_data.py's properties at 10,000+ examples.

    PYTHONPATH=. python scripts/fuzz_data.py                 # 10,000 examples (6,000 rows, 3,000 files, 1,000 sources)
    PYTHONPATH=. python scripts/fuzz_data.py --examples 50000

Prints how many cases ran, how many prepared data and how many ended in a LorakitError, and every failure
(an exception other than LorakitError, or prepared data breaking an invariant) with Hypothesis' minimal
example. Exit code 1 when anything failed. CI runs the same properties with the small ``ci`` profile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["LORAKIT_FUZZ_PROFILE"] = "long"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LORAKIT_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="examples in all (default: 10,000)")
    parser.add_argument("--only", choices=["test_rows", "test_files", "test_sources"], help="one property")
    args = parser.parse_args()
    os.environ["LORAKIT_FUZZ_EXAMPLES"] = str(args.examples)
    import test_fuzz_data as fuzz

    failures = []
    started = time.monotonic()
    for name in [args.only] if args.only else fuzz.CI_EXAMPLES:
        test = getattr(fuzz, name)
        before = dict(fuzz.CALLS)
        t0 = time.monotonic()
        try:
            test()
        except BaseException as error:  # every failure is reported, then the next property runs
            if isinstance(error, KeyboardInterrupt):
                raise
            failures.append((name, "".join(traceback.format_exception(error))[-6000:]))
        ran = {key: fuzz.CALLS[key] - before[key] for key in fuzz.CALLS}
        print(f"{name}: {ran} in {time.monotonic() - t0:.0f} s", flush=True)
    summary = {**fuzz.CALLS, "failures": len(failures), "seconds": round(time.monotonic() - started)}
    for name, text in failures:
        print(f"\n===== FAILURE in {name} =====\n{text}")
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``lorakit`` console script: a thin layer over the same builder."""

from __future__ import annotations

import argparse
import sys

from lorakit import __version__
from lorakit.errors import LorakitError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Parameter-efficient fine-tuning of open LLMs."
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser(
        "quickstart",
        help="fine-tune the embedded SmolLM2-135M on the bundled ticket data and show before/after",
    )
    quick.add_argument("--output", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    quick.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    quick.add_argument(
        "--eval-rows", type=int, default=None, help="evaluate on the first N held-out rows only"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            from lorakit.quickstart import run_quickstart

            run_quickstart(args.output, max_steps=args.steps, eval_rows=args.eval_rows)
        return 0
    except LorakitError as error:
        if args.debug:
            raise
        print(f"lorakit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Randomness that is owned, not shared.

Anything that runs between optimizer steps (evaluation, sample generation, callbacks) runs inside
:func:`forked_rng`, so the training run draws exactly the random numbers it would draw without it: a run with
evaluation and sample logging trains a bit-identical adapter to one without (LoRA dropout included).
Inference draws from its own ``torch.Generator`` (:func:`generator`), never from the global state.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

__all__ = ["RngState", "forked_rng", "generator"]


class RngState:
    """A snapshot of every global random state training draws from: Python ``random``, NumPy, torch CPU and
    every CUDA device."""

    def __init__(self) -> None:
        import numpy as np
        import torch

        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        import numpy as np
        import torch

        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """Run the block with the global random states saved before and restored after (errors included)."""
    state = RngState()
    try:
        yield
    finally:
        state.restore()


def generator(seed: int | None, device: Any = "cpu") -> Any:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    import torch

    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen

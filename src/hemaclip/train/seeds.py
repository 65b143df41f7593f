"""Seeds for every random draw of a training step, so a resumed run repeats an uninterrupted one exactly."""

from __future__ import annotations

import numpy as np


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, step, position, ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)

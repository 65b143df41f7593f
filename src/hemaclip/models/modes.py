"""`eval_mode`: run a block with a module in eval mode and give it back in the mode it was in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model): ...``: eval mode (no dropout, BatchNorm statistics frozen) inside the
    block, the module's previous train/eval mode restored after it, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)

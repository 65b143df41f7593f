"""Test-time adaptation to a folder of images from another lab: re-estimated BatchNorm statistics (AdaBN).

Why: a BatchNorm layer normalises with the mean and variance its training lab produced; another lab's
stain and camera shift those statistics, one of the main reasons CNN white-cell classifiers collapse
across labs (Tsutsui et al. 2023). AdaBN (Li et al. 2016) replaces the running statistics with the
ones of the user's own images, computed in one gradient-free pass; no weight changes, no labels.

It changes BatchNorm running means and variances and nothing else (tested). It needs the training
form of the model (BatchNorm not yet folded into the convolutions), so adapt first, then prepare for
inference. Whether it helps is measured per lab in the other-labs report, not assumed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from hemaclip.data.preprocess import preprocess_for
from hemaclip.errors import HemaclipError

__all__ = ["MIN_ADAPT_IMAGES", "adapt_batchnorm", "batchnorm_layers"]

# Fewer images than this give batch statistics too noisy to replace the training lab's.
MIN_ADAPT_IMAGES = 16


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics AdaBN re-estimates."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are those of `images` (uint8 [N, H, W, 3], the
    model's arrays); every other tensor is left as it was. Images are taken in a seeded order so the
    cumulative average does not depend on file order."""
    layers = batchnorm_layers(model)
    if not layers:
        raise HemaclipError("test-time adaptation needs BatchNorm layers; this model has none (or they are folded)")
    if len(images) < MIN_ADAPT_IMAGES:
        raise HemaclipError(f"test-time adaptation needs at least {MIN_ADAPT_IMAGES} images, got {len(images)}")
    adapted = copy.deepcopy(model)
    for layer in batchnorm_layers(adapted):
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over every batch
    preprocess = preprocess_for(adapted)
    transform = preprocess.eval_transform()
    order = np.random.default_rng(seed).permutation(len(images))
    was_training = adapted.training
    adapted.train()
    try:
        for start in range(0, len(order), batch_size):
            chunk = [images[i] for i in order[start : start + batch_size]]
            if len(chunk) < 2:
                continue  # a batch of one has no variance
            adapted.encode_image(preprocess.batch(chunk, transform), normalize=False)
    finally:
        adapted.train(was_training)
    return adapted.eval()

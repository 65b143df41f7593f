"""Test-time adaptation to a folder of images from another lab: re-estimated BatchNorm statistics (AdaBN),
or entropy minimisation of the class read-out (Tent).

Why: a BatchNorm layer normalises with the mean and variance its training lab produced; another lab's
stain and camera shift those statistics, one of the main reasons CNN white-cell classifiers collapse
across labs (Tsutsui et al. 2023). AdaBN (Li et al. 2016) replaces the running statistics with the
ones of the user's own images, computed in one gradient-free pass; no weight changes, no labels.

Tent (Wang et al. 2021, "Tent: fully test-time adaptation by entropy minimization") instead trains the
BatchNorm scales and shifts so that the class head is confident on the user's images, without labels. Here it
keeps the training lab's statistics by default (``statistics="source"``); ``"batch"`` first takes the folder's
statistics (AdaBN), as the original method normalises with test-batch statistics.

AdaBN changes BatchNorm running means and variances and nothing else; entropy adaptation changes the BatchNorm
weights and biases (and, with batch statistics, the running statistics) and nothing else (both tested). They need
the training form of the model (BatchNorm not yet folded into the convolutions), so adapt first, then prepare for
inference. Whether either helps is measured per lab in the other-labs report, not assumed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hemaclip.data.preprocess import preprocess_for
from hemaclip.errors import HemaclipError

__all__ = ["ADAPTERS", "ENTROPY", "MIN_ADAPT_IMAGES", "EntropySettings", "adapt_batchnorm", "adapt_entropy", "adapt_model", "batchnorm_layers"]

# Fewer images than this give batch statistics too noisy to replace the training lab's.
MIN_ADAPT_IMAGES = 16


@dataclass(frozen=True)
class EntropySettings:
    """One pass over the images in batches of 64, Adam at 1e-3 (the optimiser and rate of Tent's CIFAR setting) on
    the BatchNorm affine parameters only. Not tuned on any lab (bench/test_time_levers.py measures it)."""

    passes: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    statistics: str = "source"  # "source": the training lab's BatchNorm statistics; "batch": the folder's (AdaBN first)


ENTROPY = EntropySettings()


def _check_adaptable(model: nn.Module, images: np.ndarray | Sequence[np.ndarray]) -> None:
    if not batchnorm_layers(model):
        raise HemaclipError("test-time adaptation needs BatchNorm layers; this model has none (or they are folded)")
    if len(images) < MIN_ADAPT_IMAGES:
        raise HemaclipError(f"test-time adaptation needs at least {MIN_ADAPT_IMAGES} images, got {len(images)}")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics AdaBN re-estimates."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are those of `images` (uint8 [N, H, W, 3], the
    model's arrays); every other tensor is left as it was. Images are taken in a seeded order so the
    cumulative average does not depend on file order."""
    _check_adaptable(model, images)
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


def adapt_entropy(model: nn.Module, images: np.ndarray | Sequence[np.ndarray], settings: EntropySettings = ENTROPY,
                  seed: int = 0) -> nn.Module:
    """A copy of `model` whose BatchNorm weights and biases minimise the mean entropy of its class head on
    `images` (uint8 [N, H, W, 3], the model's arrays): Tent. Every other tensor is left as it was, except the
    running statistics when ``settings.statistics == "batch"`` (then AdaBN's). Seeded batch order."""
    if settings.statistics not in ("source", "batch"):
        raise HemaclipError(f"entropy adaptation: statistics must be 'source' or 'batch', got {settings.statistics!r}")
    _check_adaptable(model, images)
    if getattr(model, "class_head", None) is None:
        raise HemaclipError("entropy adaptation needs the model's class head; this checkpoint was trained without heads")
    adapted = adapt_batchnorm(model, images, settings.batch_size, seed) if settings.statistics == "batch" else copy.deepcopy(model)
    adapted.eval()  # BatchNorm normalises with fixed statistics; only its affine parameters learn
    flags = {name: p.requires_grad for name, p in adapted.named_parameters()}
    adapted.requires_grad_(False)
    params = []
    for layer in batchnorm_layers(adapted):
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    preprocess = preprocess_for(adapted)
    transform = preprocess.eval_transform()
    rng = np.random.default_rng(seed)
    with torch.enable_grad():
        for _ in range(settings.passes):
            order = rng.permutation(len(images))
            for start in range(0, len(order), settings.batch_size):
                chunk = [images[i] for i in order[start : start + settings.batch_size]]
                if len(chunk) < 2:
                    continue
                _attrs, logits = adapted.aux_logits(adapted.encode_image(preprocess.batch(chunk, transform), normalize=False))
                entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
                optimiser.zero_grad()
                entropy.backward()
                optimiser.step()
    for name, p in adapted.named_parameters():
        p.requires_grad_(flags[name])
    return adapted.eval()


# Test-time adaptations by name (describe --adapt, other-labs --adapt): each returns an adapted copy.
ADAPTERS: dict[str, Callable[[nn.Module, Sequence[np.ndarray]], nn.Module]] = {
    "bn": lambda model, images: adapt_batchnorm(model, images),
    "entropy": lambda model, images: adapt_entropy(model, images),
}


def adapt_model(model: nn.Module, images: Sequence[np.ndarray], method: str) -> nn.Module:
    """The adaptation called `method` (a key of :data:`ADAPTERS`) applied to a copy of `model`."""
    if method not in ADAPTERS:
        raise HemaclipError(f"unknown test-time adaptation '{method}' (choose from {', '.join(ADAPTERS)})")
    return ADAPTERS[method](model, images)

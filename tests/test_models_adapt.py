"""Test-time adaptation (AdaBN): it re-estimates BatchNorm statistics on the user's images and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemaclip.errors import HemaclipError
from hemaclip.models.adapt import adapt_batchnorm, batchnorm_layers


def test_adabn_changes_batchnorm_statistics_and_nothing_else(make_tiny_model, one_torch_thread) -> None:
    model = make_tiny_model("effnet-lite0-128")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(20, 32, 32, 3), dtype=np.uint8)
    images[:, :, :, 0] = 250  # a strong colour cast: another lab's statistics
    adapted = adapt_batchnorm(model, images, batch_size=8)
    stats = {f"{name}.{buf}" for name, m in adapted.named_modules() if m in batchnorm_layers(adapted) for buf in ("running_mean", "running_var", "num_batches_tracked")}
    after = adapted.state_dict()
    assert stats and set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= stats  # only BatchNorm statistics moved
    assert any(k.endswith("running_mean") for k in changed)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert not adapted.training


def test_adabn_refuses_too_few_images_and_models_without_batchnorm(make_tiny_model, one_torch_thread) -> None:
    with pytest.raises(HemaclipError, match="at least"):
        adapt_batchnorm(make_tiny_model("effnet-lite0-128"), np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(HemaclipError, match="BatchNorm"):
        adapt_batchnorm(make_tiny_model("vit-tiny-128"), np.zeros((20, 32, 32, 3), np.uint8))

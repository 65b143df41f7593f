"""Test-time adaptation: AdaBN re-estimates BatchNorm statistics on the user's images and nothing else; entropy
adaptation (Tent) trains BatchNorm scales and shifts and nothing else, and makes the class read-out surer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemaclip.errors import HemaclipError
from hemaclip.models.adapt import EntropySettings, adapt_batchnorm, adapt_entropy, adapt_model, batchnorm_layers
from hemaclip.data.preprocess import preprocess_for


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


def _cast_images(n: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    images[:, :, :, 0] = 250  # a colour cast: another lab
    return images


def _mean_entropy(model: torch.nn.Module, images: np.ndarray) -> float:
    pre = preprocess_for(model)
    with torch.no_grad():
        _attrs, logits = model.eval().aux_logits(model.encode_image(pre.batch(list(images), pre.eval_transform()), normalize=False))
    return float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())


def test_entropy_adaptation_trains_batchnorm_affine_only_and_lowers_entropy(make_tiny_model, one_torch_thread) -> None:
    model = make_tiny_model("effnet-lite0-128")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    images = _cast_images()
    adapted = adapt_entropy(model, images, EntropySettings(passes=3, lr=1e-2, batch_size=8))
    affine = {f"{name}.{p}" for name, m in adapted.named_modules() if m in batchnorm_layers(adapted) for p in ("weight", "bias")}
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= affine  # BatchNorm scales/shifts moved; statistics, convolutions, heads did not
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert {k: p.requires_grad for k, p in adapted.named_parameters()} == flags  # trainability restored
    assert not adapted.training
    assert _mean_entropy(adapted, images) < _mean_entropy(model, images)


def test_entropy_adaptation_with_batch_statistics_also_moves_running_statistics(make_tiny_model, one_torch_thread) -> None:
    model = make_tiny_model("effnet-lite0-128")
    adapted = adapt_entropy(model, _cast_images(), EntropySettings(batch_size=8, statistics="batch"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, adapted.state_dict()[k])}
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith(".weight") for k in changed)
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked", ".weight", ".bias")) for k in changed)


def test_adaptation_by_name_refuses_unknown_methods_and_headless_or_small_inputs(make_tiny_model, one_torch_thread) -> None:
    with pytest.raises(HemaclipError, match="unknown test-time adaptation 'tta'"):
        adapt_model(make_tiny_model("effnet-lite0-128"), _cast_images(), "tta")
    with pytest.raises(HemaclipError, match="at least"):
        adapt_model(make_tiny_model("effnet-lite0-128"), _cast_images(3), "entropy")
    with pytest.raises(HemaclipError, match="statistics must be"):
        adapt_entropy(make_tiny_model("effnet-lite0-128"), _cast_images(), EntropySettings(statistics="test"))
    with pytest.raises(HemaclipError, match="class head"):
        adapt_entropy(make_tiny_model("effnet-lite0-128", aux_heads=False), _cast_images())

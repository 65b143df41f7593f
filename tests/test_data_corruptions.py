"""Corruptions: shape and dtype kept, deterministic per (seed, index, severity), monotone in severity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.corruptions import CORRUPTION_NAMES, SEVERITIES, SEVERITY_PARAMS, corrupt, corrupt_batch
from hemaclip.data.preprocess import decode_image


@pytest.fixture(scope="module")
def cell(data_root: Path) -> np.ndarray:
    path = sorted((data_root / "PBC_dataset_normal_DIB" / "neutrophil").glob("*.jpg"))[0]
    return np.asarray(decode_image(path).resize((64, 64), Image.Resampling.BICUBIC))


def test_eleven_corruptions_five_severities() -> None:
    assert len(CORRUPTION_NAMES) == 11 and SEVERITIES == (1, 2, 3, 4, 5)
    assert all(len(SEVERITY_PARAMS[n]) == 5 for n in CORRUPTION_NAMES)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_each_corruption_is_deterministic_and_changes_the_image(cell: np.ndarray, name: str) -> None:
    original = cell.copy()
    for severity in (1, 5):
        out = corrupt(cell, name, severity, seed=0, index=3)
        assert out.dtype == np.uint8 and out.shape == cell.shape
        assert np.array_equal(out, corrupt(cell, name, severity, seed=0, index=3))
        assert not np.array_equal(out, cell)
    assert np.array_equal(cell, original)  # the input is never modified in place


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "occlusion", "stain_shift", "motion_blur"])
def test_random_corruptions_differ_between_images_and_seeds(cell: np.ndarray, name: str) -> None:
    a = corrupt(cell, name, 3, seed=0, index=0)
    assert not np.array_equal(a, corrupt(cell, name, 3, seed=0, index=1))
    assert not np.array_equal(a, corrupt(cell, name, 3, seed=1, index=0))


@pytest.mark.parametrize("name", ["contrast", "gaussian_noise", "shot_noise", "defocus_blur", "jpeg",
                                  "resolution_drop", "occlusion", "motion_blur"])
def test_damage_grows_with_severity(cell: np.ndarray, name: str) -> None:
    damage = [np.abs(corrupt(cell, name, s, seed=0, index=0).astype(int) - cell).mean() for s in SEVERITIES]
    assert damage[-1] > damage[0]
    assert sum(b >= a for a, b in zip(damage, damage[1:])) >= 3  # mostly monotone (random draws per severity)


def test_batch_uses_image_indices(cell: np.ndarray) -> None:
    batch = np.stack([cell, cell])
    out = corrupt_batch(batch, "gaussian_noise", 2, seed=0, indices=[7, 8])
    assert np.array_equal(out[0], corrupt(cell, "gaussian_noise", 2, seed=0, index=7))
    assert np.array_equal(out[1], corrupt(cell, "gaussian_noise", 2, seed=0, index=8))
    with pytest.raises(ValueError, match="indices"):
        corrupt_batch(batch, "jpeg", 1, indices=[1])


def test_bad_arguments(cell: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(cell, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(cell, "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(cell.astype(np.float32), "jpeg", 1)


def test_rotation_fills_corners_with_background(cell: np.ndarray) -> None:
    out = corrupt(cell, "rotation", 5, seed=0, index=0)
    corner = out[:3, :3].reshape(-1, 3).astype(int)
    ring = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])
    assert np.abs(corner - np.median(ring, axis=0)).max() <= 2

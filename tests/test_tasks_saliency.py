"""Saliency maps: shape, range, dependence on the target, for a CNN tower and the ViT tower (tiny random models)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from hemaclip.errors import HemaclipError
from hemaclip.models.factory import create_model
from hemaclip.tasks.saliency import overlay_png, saliency_map


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :80]
    blob = ((yy - 48) ** 2 + (xx - 40) ** 2 < 600)[..., None]
    return np.clip(rng.integers(150, 230, (96, 80, 3)) - blob * np.array([90, 120, 20]), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("config", ["effnet-lite0-128", "vit-tiny-128"])
def test_map_shape_range_and_target_dependence(config: str, image: np.ndarray) -> None:
    torch.manual_seed(0)  # a random model may have no positive Grad-CAM evidence for some target; fix the draw
    model = create_model(config, image_size=64, image_pretrained=None)
    by_class = saliency_map(model, image, "class")
    by_attribute = saliency_map(model, image, "nucleus_shape")
    for heat in (by_class, by_attribute):
        assert heat.shape == image.shape[:2] and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.0
    assert not np.allclose(by_class, by_attribute, atol=1e-3)
    png = overlay_png(image, by_class)
    assert Image.open(io.BytesIO(png)).size == (image.shape[1], image.shape[0])
    with pytest.raises(HemaclipError, match="not a value"):
        saliency_map(model, image, "nucleus_shape", value="purple")
    with pytest.raises(HemaclipError, match="unknown saliency target"):
        saliency_map(model, image, "colourfulness")


def test_map_falls_on_the_cell_of_an_expert_mask(data_root) -> None:
    """The shipped model's class saliency on 20 Zheng val cells lies on the cell the expert mask outlines: the share of
    the map inside the mask is twice the mask's share of the image (median), above it for every cell, while a
    background patch of the same cells (the mask moved half an image away, less the cell) gets a small share."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.other_labs import load_mask
    from hemaclip.data.preprocess import decode_image
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint

    records = [r for r in load_dataset("zheng1", data_root=data_root).split("val") if r.mask_path][:20]
    assert len(records) == 20
    model, _ = load_for_inference(resolve_checkpoint(None))
    on_cell, off_cell = [], []
    for record in records:
        image = np.asarray(decode_image(record.path))
        cell = load_mask(record.mask_path) > 0
        heat = saliency_map(model, image, "class")
        assert heat.shape == cell.shape and 0.05 < cell.mean() < 0.8
        background = np.roll(cell, (cell.shape[0] // 2, cell.shape[1] // 2), axis=(0, 1)) & ~cell
        on_cell.append(heat[cell].sum() / heat.sum() / cell.mean())
        off_cell.append(heat[background].sum() / heat.sum() / background.mean())
    assert min(on_cell) > 1.0 and np.median(on_cell) > 1.8
    assert np.median(off_cell) < 0.5


def test_class_prompts_read_the_class_through_text_not_the_head(image: np.ndarray) -> None:
    """A model trained with sentences only keeps an untrained class head: its map must follow the prompts."""
    torch.manual_seed(0)
    model = create_model("effnet-lite0-128", image_size=64, image_pretrained=None)
    prompts = {"round": ["a round cell"], "lobed": ["a cell with a lobed nucleus"]}
    by_head = saliency_map(model, image, "class")
    by_prompts = saliency_map(model, image, "class", class_prompts=prompts)
    assert by_prompts.shape == image.shape[:2] and 0.0 <= by_prompts.min() <= by_prompts.max() <= 1.0
    assert not np.allclose(by_head, by_prompts, atol=1e-3)
    with pytest.raises(HemaclipError, match="not a value"):
        saliency_map(model, image, "class", value="neutrophil", class_prompts=prompts)

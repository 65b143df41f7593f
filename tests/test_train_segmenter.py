"""Training the cell segmenter in the open (hemaclip.train.segmenter, bench/train_segmenter.py) and scoring it out of
sample (bench/cell_finding_out_of_sample.py): a trained file loads with cells.load_model, bad mask folders are refused
in one line, the Zheng training images are the val parts only, and scoring refuses weights trained on scored images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemaclip.data.cells import TinyUNet, load_model, segment_probs
from hemaclip.errors import HemaclipError
from hemaclip.train.segmenter import IGNORE, MaskedImage, SegmenterTrainConfig, _sample, pairs_from_folders, train_segmenter

REPO = Path(__file__).resolve().parents[1]


def _write_cells(root: Path, n: int = 2, side: int = 40) -> tuple[Path, Path]:
    """`n` synthetic smears: a purple disc (cytoplasm, mask 128) with a dark core (nucleus, 255) on a pale ground."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    yy, xx = np.mgrid[:side, :side]
    for i in range(n):
        r = np.hypot(yy - side / 2 - i, xx - side / 2)
        mask = np.where(r < 6, 255, np.where(r < 12, 128, 0)).astype(np.uint8)
        image = np.full((side, side, 3), (235, 215, 200), np.uint8)
        image[mask == 128] = (170, 140, 200)
        image[mask == 255] = (70, 40, 110)
        Image.fromarray(image).save(images / f"{i:03d}.png")
        Image.fromarray(mask).save(masks / f"{i:03d}.png")
    return images, masks


def test_training_entry_writes_a_checkpoint_that_load_model_loads(tmp_path: Path) -> None:
    images, masks = _write_cells(tmp_path)
    out = tmp_path / "seg.pt"
    run = subprocess.run([sys.executable, "-m", "bench.train_segmenter", "--images", str(images), "--masks", str(masks),
                          "--steps", "2", "--batch-size", "2", "--crop", "32", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    model = load_model(out)
    assert isinstance(model, TinyUNet)
    probs = segment_probs(np.asarray(Image.open(images / "000.png")), 1.0, model)
    assert probs.shape == (3, 40, 40) and np.allclose(probs.sum(0), 1.0, atol=1e-4)
    # two Adam steps moved the weights away from the seeded initialisation
    torch.manual_seed(SegmenterTrainConfig.seed)
    fresh = TinyUNet()
    assert not torch.allclose(fresh.head.weight, model.head.weight, atol=1e-4)
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["images"] == ["000.png", "001.png"] and record["config"]["steps"] == 2
    assert record["loss_curve"][-1]["step"] == 2


def test_trainer_refuses_a_mask_folder_without_masks_in_one_line(tmp_path: Path) -> None:
    images, masks = _write_cells(tmp_path)
    for mask in masks.iterdir():
        mask.unlink()
    (masks / "notes.txt").write_text("no masks here")
    with pytest.raises(HemaclipError, match="no masks"):
        pairs_from_folders(images, masks)
    run = subprocess.run([sys.executable, "-m", "bench.train_segmenter", "--images", str(images), "--masks", str(masks),
                          "--steps", "2", "--out", str(tmp_path / "seg.pt")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no masks" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "seg.pt").exists()


def test_training_samples_keep_the_three_mask_classes_and_ignore_padding() -> None:
    target = np.zeros((20, 20), np.uint8)
    target[5:15, 5:15] = 1
    target[8:12, 8:12] = 2
    item = MaskedImage(np.full((20, 20, 3), 200, np.uint8), target, "tiny")
    config = SegmenterTrainConfig(crop=64, diameter_range=(12.0, 12.0))  # the cell stays small: the crop needs padding
    x, y = _sample(item, config, np.random.default_rng(0))
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(torch.unique(y).tolist()) == {IGNORE, 0, 1, 2}


def test_training_config_refuses_a_crop_off_the_nets_stride() -> None:
    with pytest.raises(HemaclipError, match="crop"):
        SegmenterTrainConfig(crop=40)
    with pytest.raises(HemaclipError, match="at least one image"):
        train_segmenter([], "unused.pt")


def test_zheng_training_images_are_the_val_parts_only() -> None:
    from bench.train_segmenter import zheng_pairs

    from hemaclip.data.datasets import load_dataset

    _, keys = zheng_pairs(None)
    val = {f"{n}/{Path(r.path).name}" for n in ("zheng1", "zheng2") for r in load_dataset(n).split("val")}
    test = {f"{n}/{Path(r.path).name}" for n in ("zheng1", "zheng2") for r in load_dataset(n).split("test")}
    assert set(keys) == val and not set(keys) & test and len(test) > len(val) > 0


def test_out_of_sample_scoring_refuses_weights_trained_on_a_scored_image(tmp_path: Path, capsys) -> None:
    from bench import cell_finding_out_of_sample as oos

    from hemaclip.data.datasets import load_dataset

    scored = Path(load_dataset("zheng1").split("test")[0].path).name
    weights = tmp_path / "seg.pt"
    weights.write_bytes(b"not read")
    weights.with_name(weights.name + ".json").write_text(json.dumps({"images": [f"zheng1/{scored}"]}))
    assert oos.main(["--weights", str(weights), "--out", str(tmp_path / "out.json")]) == 2
    assert "not out of sample" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()

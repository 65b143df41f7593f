"""Stain normalisation (Macenko, Reinhard), HED colour space, stain jitter and the --stain-norm option."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hemaclip.data.corruptions import corrupt
from hemaclip.data.preprocess import decode_image
from hemaclip.data.stain import (
    NORMALIZER_NAMES,
    default_reference,
    get_normalizer,
    hed_jitter,
    hed_to_rgb,
    normalize_batch,
    normalizer_id,
    rgb_to_hed,
)
from hemaclip.data.transforms import AugmentConfig, RandomHEDJitter, train_transform
from hemaclip.errors import HemaclipError


@pytest.fixture(scope="module")
def cells(data_root: Path) -> list[np.ndarray]:
    pbc = data_root / "PBC_dataset_normal_DIB"
    paths = [sorted((pbc / c).glob("*.jpg"))[0] for c in ("lymphocyte", "monocyte", "neutrophil", "eosinophil")]
    return [np.asarray(decode_image(p).resize((96, 96), Image.Resampling.BICUBIC)) for p in paths]


def test_names_and_none() -> None:
    assert NORMALIZER_NAMES == ("none", "macenko", "reinhard")
    assert get_normalizer(None) is None and get_normalizer("none") is None
    assert normalizer_id(None) == "none"
    with pytest.raises(HemaclipError, match="unknown stain normaliser 'vahadane' \\(--stain-norm\\)"):
        get_normalizer("vahadane")


def test_shipped_reference_is_parameters_not_an_image() -> None:
    ref = default_reference()
    assert np.asarray(ref.macenko_he).shape == (3, 2)
    assert len(ref.macenko_max_c) == 2 and len(ref.reinhard_means) == 3 and len(ref.reinhard_stds) == 3
    assert ref.source.endswith(".jpg")


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_normalisers_map_uint8_rgb_to_uint8_rgb(cells: list[np.ndarray], name: str) -> None:
    normalize = get_normalizer(name)
    for image in cells:
        out = normalize(image)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert not np.array_equal(out, image)
        assert np.array_equal(out, normalize(image))  # deterministic
    assert normalize.fallbacks == 0
    assert normalizer_id(normalize).startswith(name + ":")
    batch = normalize_batch(np.stack(cells), normalize)
    assert np.array_equal(batch[1], normalize(cells[1]))


def test_reinhard_undoes_most_of_a_stain_shift(cells: list[np.ndarray]) -> None:
    normalize = get_normalizer("reinhard")
    for index, image in enumerate(cells):
        shifted = corrupt(image, "stain_shift", 4, seed=0, index=index)
        before = np.abs(shifted.astype(int) - image).mean()
        after = np.abs(normalize(shifted).astype(int) - normalize(image)).mean()
        assert after < 0.6 * before


def test_fitting_on_an_image_makes_it_a_fixed_point(cells: list[np.ndarray]) -> None:
    normalize = get_normalizer("reinhard", reference=cells[0])
    assert np.abs(normalize(cells[0]).astype(int) - cells[0]).mean() < 1.5
    assert normalizer_id(normalize) != normalizer_id(get_normalizer("reinhard"))


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
@pytest.mark.parametrize("fill", [0, 128, 255])
def test_blank_images_fall_back_to_identity_with_a_warning(name: str, fill: int) -> None:
    normalize = get_normalizer(name)
    blank = np.full((32, 32, 3), fill, dtype=np.uint8)
    with pytest.warns(RuntimeWarning, match="returning it unchanged"):
        out = normalize(blank)
    assert np.array_equal(out, blank) and normalize.fallbacks == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once per normaliser, not once per image
        normalize(blank)
    assert normalize.fallbacks == 2


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)])
def test_wrong_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        get_normalizer("reinhard")(bad)


def test_hed_round_trip_and_jitter(cells: list[np.ndarray]) -> None:
    image = cells[0]
    assert np.array_equal(hed_to_rgb(rgb_to_hed(image)), image)
    assert np.array_equal(hed_jitter(image, np.random.default_rng(0), 0.0), image)
    a = hed_jitter(image, np.random.default_rng(3), 0.3)
    b = hed_jitter(image, np.random.default_rng(3), 0.3)
    c = hed_jitter(image, np.random.default_rng(4), 0.3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Doubling haematoxylin darkens the (blue-purple) nucleus: the darkest pixels get darker.
    darker = hed_jitter(image, None, 0.0, alphas=np.array([2.0, 1.0, 1.0]), betas=np.zeros(3))
    nucleus = image.sum(axis=2) < np.percentile(image.sum(axis=2), 10)
    assert darker[nucleus].astype(int).sum() < image[nucleus].astype(int).sum()


def test_train_transform_stain_jitter_is_seeded(cells: list[np.ndarray]) -> None:
    x = torch.from_numpy(cells[1]).permute(2, 0, 1)
    jitter = train_transform(64, AugmentConfig(stain_jitter=0.3))
    plain = train_transform(64, AugmentConfig())
    assert any(isinstance(step, RandomHEDJitter) for step in jitter.transforms)
    assert not any(isinstance(step, RandomHEDJitter) for step in plain.transforms)
    torch.manual_seed(5)
    a = jitter(x)
    torch.manual_seed(5)
    b = jitter(x)
    torch.manual_seed(6)
    c = jitter(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        RandomHEDJitter(-0.1)


def test_train_config_has_stain_jitter() -> None:
    from hemaclip.train.config import TrainConfig, load_train_config

    assert TrainConfig().stain_jitter == 0.0
    assert load_train_config("tiny", {"stain_jitter": 0.2}).stain_jitter == 0.2


def test_features_with_stain_normalisation(data_root: Path, make_tiny_model) -> None:
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.features import extract_features

    model = make_tiny_model()
    records = load_dataset("wbcatt", data_root=data_root).split("val")[:6]
    plain = extract_features(model, records, checkpoint_id="tiny-test")
    normed = extract_features(model, records, checkpoint_id="tiny-test", stain_normalizer=get_normalizer("reinhard"))
    again = extract_features(model, records, checkpoint_id="tiny-test", stain_normalizer=get_normalizer("reinhard"))
    assert plain.features.shape == normed.features.shape
    assert not np.allclose(plain.features, normed.features)  # a separate cache entry, not the plain one
    assert np.allclose(normed.features, again.features)


def test_evaluate_refuses_an_unknown_stain_norm() -> None:
    from typer.testing import CliRunner

    from hemaclip.cli import app
    from hemaclip.errors import HemaclipError

    result = CliRunner().invoke(app, ["evaluate", "--out", "unused", "--stain-norm", "vahadane"])
    assert isinstance(result.exception, HemaclipError) and "--stain-norm" in str(result.exception)


def test_evaluation_passes_the_normaliser_to_feature_extraction(data_root: Path, tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research.evaluate import load_model_features, run_evaluation

    checkpoint = tiny_vit_checkpoint
    records = {"eval": load_dataset("wbcatt", data_root=data_root).split("test")[:4]}
    _, _, _, plain = load_model_features(checkpoint, records)
    _, _, _, normed = load_model_features(checkpoint, records, stain_normalizer=get_normalizer("reinhard"))
    assert not np.allclose(plain["eval"].features, normed["eval"].features)
    assert "stain=reinhard:" in normed["eval"].meta["checkpoint_id"]
    features = tmp_path / "f.npy"
    np.save(features, np.ones((2, 4), dtype=np.float32))
    index = tmp_path / "i.csv"
    index.write_text("path,label,split\na.png,lymphocyte,test\nb.png,lymphocyte,test\n")
    with pytest.raises(HemaclipError, match="stain normalisation needs images"):
        run_evaluation(None, "wbcatt", "test", tmp_path / "ext", features=features, index_csv=index,
                       stain_normalizer=get_normalizer("reinhard"))

"""One preprocessing path from file to model tensor: the same bits as before it was one path, for every caller."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import ImageDecodeError, Preprocess, decode_image, preprocess_for
from hemaclip.errors import HemaclipError

# SHA-1 of the uint8 arrays the previous code made of these files (decoded-image cache, describe's and
# index's own resize copies; all three agreed), at the shipped model's 128 px and at the 192 px storage size.
BEFORE = {
    "PBC_dataset_normal_DIB/basophil/BA_100102.jpg": ("06ab91e2b979af4cc15eaadbebf3baf8f5580407", "6ecbbcd1ebd628906e3584eb711ad510ec24174e"),
    "PBC_dataset_normal_DIB/erythroblast/ERB_101031.jpg": ("b29798ff70a4ad7e039967d4777b331d594f9f29", "ef1d09e5b9b54d4b7cb7096b62bee7e2462b551c"),
    "PBC_dataset_normal_DIB/platelet/PLATELET_100161.jpg": ("9ee602f2cd24ff67f39a50ca07ec5444e488eadd", "a3eccbd4f0372afe61d7ce09e77c89fb5c68d76e"),
    "PBC_dataset_normal_DIB/neutrophil/BNE_100878.jpg": ("39ec0f61fd8a9c9e29fc4da457cfc9c3ed3cba8f", "0adb14eb368df0f92047c93e4637beaecf249f23"),
    "all_aria/Pro/WBC-Malignant-Pro-001.jpg": ("576845539fb5552778bba2e1cda36e488aaa42e0", "0ddd486d2cb90aee9ebdbe0ff34a5c2bc465bfd4"),
}


def sha1(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped():
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import default_checkpoint_path

    model, _ = load_for_inference(default_checkpoint_path())
    return model


def test_every_caller_gets_the_same_arrays_as_before(data_root: Path, shipped, tmp_path: Path) -> None:
    from hemaclip.serve.app import decode_upload
    from hemaclip.tasks.describe import Describer

    preprocess = preprocess_for(shipped)
    config = shipped.config
    assert shipped.config.preprocess == {} and preprocess.cache_id == ""
    assert preprocess == Preprocess(128, tuple(config.image_mean), tuple(config.image_std))
    paths = [data_root / name for name in BEFORE]
    cache = decoded_images(paths, 128, directory=tmp_path, progress=False, preprocess=preprocess)
    storage = decoded_images(paths, 192, directory=tmp_path, progress=False, preprocess=preprocess)
    describer = Describer(shipped)
    for i, (path, (at_128, at_192)) in enumerate(zip(paths, BEFORE.values())):
        assert sha1(cache[i]) == at_128 and sha1(storage[i]) == at_192, path
        assert sha1(preprocess.load(path)) == at_128  # index build, search --image
        assert sha1(describer.prepare(decode_image(path))) == at_128  # describe
        assert sha1(describer.prepare(np.asarray(decode_upload(path.read_bytes(), path.name)))) == at_128  # serve


def test_tensors_are_todays_eval_transform(data_root: Path, shipped) -> None:
    """uint8 array -> tensor: torchvision's bicubic resize to the model size, then the model's mean/std."""
    from torchvision.transforms import v2 as T

    reference = T.Compose([
        T.ToImage(),
        T.Resize((128, 128), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(shipped.config.image_mean), list(shipped.config.image_std)),
    ])
    preprocess = preprocess_for(shipped)
    arrays = [preprocess.load(data_root / name) for name in BEFORE] + [preprocess.load(data_root / next(iter(BEFORE)), 64)]
    expected = torch.stack([reference(torch.from_numpy(np.array(a)).permute(2, 0, 1)) for a in arrays])
    assert torch.equal(preprocess.batch(arrays), expected)


def test_decode_is_the_one_place_that_opens_images(tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "cell.png"
    Image.new("RGBA", (20, 16), (200, 10, 10, 0)).save(png)
    from_file, from_bytes = decode_image(png), decode_image(png.read_bytes(), "cell.png")
    assert from_file.mode == from_bytes.mode == "RGB" and np.array_equal(np.asarray(from_file), np.asarray(from_bytes))
    assert np.asarray(from_file)[0, 0].tolist() == [255, 255, 255]  # transparent pixels on white
    cases = [(tmp_path / "absent.jpg", "missing"), (b"", "empty"), (b"not an image at all", "not_image")]
    for source, kind in cases:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(source)
        assert err.value.kind == kind
    with pytest.raises(ImageDecodeError, match="image format PNG is not accepted; send JPEG") as err:
        decode_image(png.read_bytes(), "cell.png", formats=("JPEG",))
    assert err.value.kind == "format"


def test_preprocess_field_is_checked_and_old_checkpoints_load_unchanged(tmp_path: Path, tiny_vit_checkpoint: Path) -> None:
    from hemaclip.models import ModelConfig
    from hemaclip.models.checkpoint import load_checkpoint

    config = ModelConfig(name="x", preprocess={"resize": "bicubic"})
    assert Preprocess.from_config(config) == Preprocess(128) and Preprocess.from_config(config).options == {"locate": "whole", "resize": "bicubic", "frame": "2.5"}
    with pytest.raises(HemaclipError, match="unknown preprocess option"):
        ModelConfig(name="x", preprocess={"crop": "centre"})
    with pytest.raises(HemaclipError, match="locate='cells' is not supported"):
        ModelConfig(name="x", preprocess={"locate": "cells"})
    payload = torch.load(tiny_vit_checkpoint, weights_only=True)
    assert payload["model_config"]["preprocess"] == {}
    del payload["model_config"]["preprocess"]  # as in every checkpoint saved before the field existed
    torch.save(payload, tmp_path / "old.pt")
    model, _ = load_checkpoint(tmp_path / "old.pt")
    assert model.config.preprocess == {} and preprocess_for(model).spec == () and preprocess_for(model).image_size == 32

"""Model configs, the factory, and forward shapes of every bundled config (CPU, 64 px, batch 4)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hemaclip.data.attributes import ATTRIBUTES, PBC_CLASSES, WBCATT_CLASSES
from hemaclip.errors import HemaclipError
from hemaclip.models import ModelConfig, create_model, get_model_config, list_models
from hemaclip.models.config import MODEL_CONFIGS

EXPECTED = {"resnet18-128", "vit-tiny-128", "effnet-lite0-128", "mobilenetv2-128"}
SENTENCES = ["a big round cell", "a small cell with a round nucleus", "purple granules", "a band neutrophil"]


def test_bundled_configs_listed_and_round_trip() -> None:
    assert EXPECTED <= set(list_models())
    for name, path in MODEL_CONFIGS.items():
        raw = json.loads(path.read_text())
        assert raw["name"] == name == path.stem
        config = ModelConfig.from_json(path)
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert config.class_names == WBCATT_CLASSES and list(config.attributes) == list(ATTRIBUTES)


def test_config_errors() -> None:
    with pytest.raises(HemaclipError, match="nope: no such model config"):
        get_model_config("nope")
    with pytest.raises(HemaclipError, match="unknown model config key"):
        get_model_config("resnet18-128", image_sise=64)
    with pytest.raises(HemaclipError, match="embed_dim"):
        get_model_config("resnet18-128", embed_dim=0)
    with pytest.raises(HemaclipError, match="unknown image backend"):
        create_model("resnet18-128", image_backend="keras")
    with pytest.raises(HemaclipError, match="proj_type"):
        create_model("resnet18-128", proj_type="cubic", image_size=64)


def test_config_from_json_path(tmp_path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"image_tower": "resnet18", "embed_dim": 32, "image_size": 64}))
    config = get_model_config(str(path))
    assert config.name == "tiny" and config.embed_dim == 32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, image_size=64).eval()
    images = torch.randn(4, 3, 64, 64)
    tokens = model.tokenize(SENTENCES)
    with torch.no_grad():
        out = model(images, tokens)
        pooled = model.embed_sentences(SENTENCES, batch_size=3)
        from_features = model.encode_text(pooled)
        channels_last = model.to(memory_format=torch.channels_last).encode_image(
            images.contiguous(memory_format=torch.channels_last)
        )
    assert out["image_features"].shape == (4, 256) and out["text_features"].shape == (4, 256)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    assert out["class_logits"].shape == (4, len(WBCATT_CLASSES))
    assert {k: v.shape[-1] for k, v in out["attribute_logits"].items()} == {k: len(v) for k, v in ATTRIBUTES.items()}
    assert pooled.shape == (4, 384)
    assert torch.allclose(from_features, out["text_features"], atol=1e-5)
    assert torch.allclose(channels_last, out["image_features"], atol=1e-4)


def test_aux_heads_off_and_custom_vocab() -> None:
    model = create_model("mobilenetv2-128", image_size=64, aux_heads=False, image_pretrained=None)
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 384))
    assert out["attribute_logits"] is None and out["class_logits"] is None
    model = create_model("mobilenetv2-128", image_size=64, class_names=list(PBC_CLASSES), image_pretrained=None)
    assert model(torch.randn(2, 3, 64, 64), torch.randn(2, 384))["class_logits"].shape == (2, len(PBC_CLASSES))
    assert model.vocabularies()["classes"] == list(PBC_CLASSES)


def test_logit_scale_clamped_and_text_inputs() -> None:
    model = create_model("resnet18-128", image_size=64, embed_dim=32).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.get_logit_scale().item() == pytest.approx(100.0)
    tokens = model.tokenize(["a cell", "an irregular big cell"])
    with torch.no_grad():
        via_dict = model.encode_text(tokens)
        via_ids = model.encode_text(tokens["input_ids"])  # mask inferred from the pad id
    assert via_dict.shape == (2, 32)
    assert torch.allclose(via_dict, via_ids, atol=1e-5)
    with pytest.raises(ValueError, match="384"):
        model.encode_text(torch.randn(2, 100))
